"""The compression pipeline: pair the tensors of base and fine-tune, calibrate block by block,
compress each delta with the method, write the artifact atomically."""

from __future__ import annotations

import functools
import hashlib
import os
import resource
import time
from dataclasses import asdict
from fractions import Fraction
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from . import __version__, timing
from .artifact import FORMAT, FORMAT_VERSION, AtomicFolder, prepare_output, write_artifact
from .checkpoint import Checkpoint, config_fingerprint
from .errors import AdamixError, all_finite
from .methods import METHODS, compress_with
from .methods.adamix import analyse, budget_bits, compress_jointly
from .methods.base import Encoded, Settings, stored_suffixes
from .methods.bitdelta import BITDELTA_ALPHA
from .methods.raw import encode_raw
from .memory import release_freed_memory
from .methods.rows import compress_rows
from .partial import PartialRun
from .validate import size_totals
from .preflight import check_before_calibration
from .vocab import add_new_rows, added_rows

MIN_SVD_DIM = 32  # matrices with a side shorter than this are stored raw (fp16)
DEFAULT_WIDTHS = (0, 2, 3, 4, 8)
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


def parse_ratio(value: str | float) -> float:
    """'1/16', '0.0625' or a float -> alpha in (0, 1]."""
    try:
        alpha = float(Fraction(value)) if isinstance(value, str) else float(value)
    except (ValueError, ZeroDivisionError):
        raise AdamixError(f"--ratio {value!r} is not a number or fraction such as 1/16") from None
    if not 0 < alpha <= 1:
        raise AdamixError(f"--ratio must be in (0, 1], got {value}")
    return alpha


def parse_widths(value: str | tuple | list) -> tuple[int, ...]:
    """'0,2,3,4,8' -> (0, 2, 3, 4, 8); 0 (dropping a triplet) is always allowed."""
    try:
        widths = sorted({int(b) for b in (value.split(",") if isinstance(value, str) else value)} | {0})
    except ValueError:
        raise AdamixError(f"--bits {value!r} must be comma-separated integers such as 0,2,3,4,8") from None
    if any(not 0 <= b <= 8 for b in widths) or len(widths) < 2:
        raise AdamixError(f"--bits must list widths between 1 and 8 (0 is implied), got {value!r}")
    return tuple(widths)


def check_method_options(method: str, alpha: float, whiten: bool, budget_scope: str) -> None:
    """Refuse combinations a method does not support, in one line."""
    if method not in METHODS:
        raise AdamixError(f"--method {method!r} is not one of {', '.join(METHODS)}")
    if whiten and method != "adamix":
        raise AdamixError(f"--whiten applies to --method adamix only, not {method}")
    if budget_scope != "tensor" and method != "adamix":
        raise AdamixError(f"--budget-scope {budget_scope} applies to --method adamix only, not {method}")
    if method == "bitdelta" and alpha < BITDELTA_ALPHA:
        raise AdamixError(f"bitdelta stores 1 bit per weight (ratio 1/16); it cannot meet --ratio {alpha:.4g}")


def pair_tensors(base: Checkpoint, ft: Checkpoint) -> tuple[list[str], list[str]]:
    """Names of the float tensors to compare, and the base's non-float extras the fine-tune lacks.

    Refuses pairs whose tensors differ in names or shapes, with one line naming the first difference;
    the one difference accepted is added vocabulary: a 2-D float tensor with more rows (dim 0) in the
    fine-tune (see vocab.py).
    """
    bk, fk = set(base.keys()), set(ft.keys())
    dropped = []
    for name in sorted(bk - fk):
        shape, dtype = base.slice_info(name)
        if dtype in FLOAT_DTYPES:
            raise AdamixError(f"tensor {name} {list(shape)} is in the base but not in the fine-tune: "
                              "not a fine-tune of this base?")
        dropped.append(name)
    for name in sorted(fk - bk):
        raise AdamixError(f"tensor {name} is in the fine-tune but not in the base: not a fine-tune of this base?")
    names = []
    for name in sorted(bk & fk):
        (sb, db), (sf, df) = base.slice_info(name), ft.slice_info(name)
        if sb != sf and not (added_rows(sb, sf) and db in FLOAT_DTYPES and df in FLOAT_DTYPES):
            raise AdamixError(f"tensor {name} has shape {list(sb)} in the base but {list(sf)} in the fine-tune: "
                              "the two models do not match")
        if db in FLOAT_DTYPES and df in FLOAT_DTYPES:
            names.append(name)
    return names, dropped


def is_svd_shape(shape: tuple[int, ...]) -> bool:
    """Matrices go through the method; vectors and very thin matrices are stored raw."""
    return len(shape) == 2 and min(shape) >= MIN_SVD_DIM


def overhead_per_element(base: Checkpoint, names: list[str]) -> float:
    """Bits of file header and manifest that each element of the method's tensors must carry.

    Estimated from the names: per method tensor two header entries and a manifest entry, per raw
    tensor one of each, plus the manifest's fixed fields; spread over the method's tensors in
    proportion to their size, so that the whole artifact, not only its codes, meets alpha.
    """
    total_bytes, elements = 2048.0, 0
    for name in names:
        shape, _ = base.slice_info(name)
        if is_svd_shape(shape):
            total_bytes += 3 * len(name) + 440
            elements += shape[0] * shape[1]
        else:
            total_bytes += 2 * len(name) + 200
    return 8 * total_bytes / elements if elements else 0.0


def delta_of(base: Checkpoint, ft: Checkpoint, name: str) -> torch.Tensor:
    """W_ft - W_base in float32; refuses non-finite weights. Where the fine-tune adds rows (vocab.py),
    the delta of the rows the two share."""
    wb, wf = base.get(name), ft.get(name)
    for which, w in (("base", wb), ("fine-tune", wf)):
        if not all_finite(w):
            raise AdamixError(f"tensor {name} of the {which} contains NaN or Inf")
    return wf[:wb.shape[0]].float() - wb.float() if wf.shape != wb.shape else wf.float() - wb.float()


def encode_block(names: dict[str, tuple[torch.Tensor | None, bool]], load: Callable[[str], torch.Tensor],
                 settings: Settings, overhead: float) -> dict[str, tuple[Encoded, bool]]:
    """Encode the deltas of one block {name: (H float32 or None, transposed)}; load(name) gives D.

    One tensor at a time: entries are popped from `names` as they are encoded, so a Gram is freed once
    the last linear sharing it is done, and a D lives only while it is encoded. The Gram stays float32
    (never a float64 copy: 1 GB at width 11008); linalg.gram_rows / matmul64 say how it is used. With
    budget_scope "block" the method's matrices share one allocation (methods.adamix.compress_jointly)."""
    out = {}
    joint = []
    for name in list(names):
        H, transposed = names.pop(name)  # float32: products with it run in float32, sums in float64
        D = load(name)
        if settings.budget_scope == "block" and settings.method == "adamix" and bool(D.any()) and is_svd_shape(tuple(D.shape)):
            Dl = D.T if transposed else D
            joint.append((name, transposed, analyse(Dl, H, settings, overhead * D.numel())))
            continue
        enc = encode_tensor(D, H, transposed, settings, overhead)
        if enc is not None:
            out[name] = (enc, transposed)
        del D, H
        release_freed_memory()
    for (name, transposed, _), enc in zip(joint, compress_jointly([a for _, _, a in joint], settings)):
        out[name] = (enc, transposed)
    return out


def encode_tensor(D: torch.Tensor, H: torch.Tensor | None, transposed: bool, settings: Settings,
                  overhead: float = 0.0, **shared) -> Encoded | None:
    """The stored form of one delta (None if it is exactly zero); overhead: bits per element reserved.

    shared: precomputed pieces (factors, analysis: see methods.compress_with; rows: the row-sparse
    alternative of a data-free matrix at this budget)."""
    if not bool(D.any()):
        return None
    if is_svd_shape(tuple(D.shape)):
        enc = compress_with(D.T if transposed else D, H, settings, overhead * D.numel(),
                            shared.get("factors"), shared.get("analysis"))
        if H is None:  # data-free matrices (embeddings, heads): keep the better of the method and row-sparse
            alt = shared.get("rows") or row_sparse(D, settings, overhead)
            if alt.stats["error_measured"] < enc.stats["error_measured"]:
                return alt
        return enc
    return encode_raw(D)


def row_sparse(D: torch.Tensor, settings: Settings, overhead: float) -> Encoded:
    """The row-sparse encoding of a data-free matrix D (m x n) at the method's budget."""
    alpha = min(settings.alpha, BITDELTA_ALPHA) if settings.method == "bitdelta" else settings.alpha
    return compress_rows(D, settings.widths, settings.group_size,
                         budget_bits(D.shape[0], D.shape[1], alpha, overhead * D.numel()))


def compress(base: str | os.PathLike, finetuned: str | os.PathLike, out: str | os.PathLike, *,
             method: str = "adamix", ratio: str | float = "1/16", calib: str | os.PathLike | None = "default", samples: int = 128,
             seqlen: int = 256, bits: str | tuple = DEFAULT_WIDTHS, group_size: int = 128,
             device: str = "cpu", seed: int = 0, whiten: bool = False, budget_scope: str = "tensor",
             distill_steps: int = 0, overwrite: bool = False, resume: bool = False, progress: bool = True) -> dict:
    """Compress `finetuned` against `base` with `method` (METHODS; default ADAMIX) and write the
    artifact folder `out`.

    calib: a text file, "default" (gensim's lee_background.cor) or None (data-free: H = I, RTN).
    distill_steps: bitdelta only: train its scales this many steps on the calibration windows.
    Work is written block by block to a hidden sibling of `out` (partial.PartialRun); resume=True
    continues an interrupted run from there, with a byte-identical result. `out` appears only
    complete. Returns the manifest that was written, plus (not in the file) "seconds_by_phase".
    """
    t0 = time.time()
    timing.reset()
    alpha = parse_ratio(ratio)
    widths = parse_widths(bits)
    if group_size < 1 or samples < 1 or seqlen < 4:
        raise AdamixError("--group-size and --samples must be >= 1 and --seqlen >= 4")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AdamixError(f"--device {device}: no CUDA device is available")
    if budget_scope not in ("tensor", "block"):
        raise AdamixError(f"--budget-scope must be 'tensor' or 'block', got {budget_scope!r}")
    check_method_options(method, alpha, whiten, budget_scope)
    if distill_steps and (method != "bitdelta" or calib is None or distill_steps < 0):
        raise AdamixError("--distill-steps needs --method bitdelta and calibration text (not --calib none)")
    out = prepare_output(out, overwrite)
    torch.manual_seed(seed)
    settings = Settings(method=method, alpha=alpha, widths=widths, group_size=group_size, whiten=whiten,
                        budget_scope=budget_scope)
    base_ck, ft_ck = Checkpoint(base), Checkpoint(finetuned)
    names, dropped = pair_tensors(base_ck, ft_ck)
    overhead = overhead_per_element(base_ck, names)
    check_before_calibration(base_ck, ft_ck, names, settings, overhead, ratio, distill_steps, calib is not None)
    calib_path = None
    if calib is not None:
        from .calibrate import default_calibration_file, read_text
        calib_path = default_calibration_file() if str(calib) == "default" else Path(calib)
        text = read_text(calib_path)
    extra = {"calibration": str(calib_path.name) if calib_path else None, "samples": samples, "seqlen": seqlen,
             "device": device, "seed": seed}
    if distill_steps:
        extra["distill_steps"] = distill_steps
    with timing.phase("fingerprints"):
        fingerprints = {"base": base_ck.fingerprint(), "finetune": ft_ck.fingerprint(),
                        "finetune_config": config_fingerprint(ft_ck)}
    key = {"tool_version": __version__, "format_version": FORMAT_VERSION, "settings": asdict(settings), **extra,
           "calibration_sha256": hashlib.sha256(text.encode()).hexdigest() if calib_path else None, **fingerprints}
    work = PartialRun(out, key, resume=resume, overwrite=overwrite)
    with work:  # removed at the end, or on bad input found midway; an interruption keeps it for --resume
        todo = set(names)
        for chunk in work.chunks():
            todo.difference_update(work.done(chunk)["names"])
        load = functools.partial(delta_of, base_ck, ft_ck)

        def store(chunk: str, covered: list[str], encoded: dict[str, tuple[Encoded, bool]]) -> None:
            add_new_rows(encoded, base_ck, ft_ck, covered, group_size)
            entries, tensors = encoded_entries(base_ck, encoded)
            with timing.phase("write"):
                work.write(chunk, covered, entries, tensors)
            todo.difference_update(covered)

        windows = None
        if calib_path is not None:
            from transformers import AutoTokenizer

            from .calibrate import BlockRunner, token_windows
            try:
                tokenizer = AutoTokenizer.from_pretrained(ft_ck.folder)
            except Exception as e:
                raise AdamixError(f"{ft_ck.folder}: cannot load the fine-tune's tokenizer ({e})") from None
            windows = token_windows(text, tokenizer, samples, seqlen)
            runner = BlockRunner(ft_ck, windows, device)
            skip = frozenset(i for i in range(len(runner.blocks)) if work.done(block_chunk(i)))
            bar = tqdm(runner.run(skip), total=len(runner.blocks), initial=len(skip), desc="calibrate+compress blocks",
                       disable=not progress, unit="block")
            for i, infos, grams in bar:
                block = {info.name: (grams.pop(info.name), info.transposed) for info in infos if info.name in todo}
                grams.clear()  # the runner's dict: emptied so that each Gram is freed once its linears are done
                store(block_chunk(i), list(block), encode_block(block, load, settings, overhead))
                del block
        rest = sorted(todo)
        for name in tqdm(rest, desc="compress other tensors (data-free)", disable=not progress or not rest, unit="tensor"):
            enc = encode_tensor(load(name), None, False, settings, overhead)
            store("rest-" + name.replace(os.sep, "_"), [name], {name: (enc, False)} if enc is not None else {})
            release_freed_memory()

        entries = work.entries()
        sources: dict[str, torch.Tensor | Path] = dict(work.tensor_files())
        if distill_steps:
            from .distill import distill_scales
            stored = work.read(list(sources))
            encoded = {n: encoded_from_entry(e, {s: stored[f"{n}.{s}"] for s in stored_suffixes(e["kind"])})
                       for n, e in entries.items()}
            torch.manual_seed(seed)
            extra["distill"] = distill_scales(base_ck, ft_ck, encoded, windows, distill_steps, device=device, progress=progress)
            entries, tensors = encoded_entries(base_ck, encoded)
            sources = dict(tensors)
        manifest = build_manifest(fingerprints["base"], fingerprints["finetune_config"], entries, dropped, settings, extra)
        with timing.phase("write"), AtomicFolder(out, overwrite, within=work.folder) as tmp:
            write_artifact(tmp, manifest, sources, ft_ck.config_files())
    manifest["sizes"]["wall_seconds"] = round(time.time() - t0, 2)
    manifest["sizes"]["peak_rss_mib"] = round(peak_rss_mib(), 1)
    manifest["seconds_by_phase"] = timing.snapshot()
    manifest["resumed_chunks"] = len(work.resumed)
    return manifest


def block_chunk(i: int) -> str:
    return f"block-{i:04d}"


def peak_rss_mib() -> float:
    """This process's peak resident memory. Linux: VmHWM of /proc/self/status, which starts afresh at
    exec (ru_maxrss also counts the memory of the parent a child process was forked from)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def encoded_entries(base_ck: Checkpoint, encoded: dict[str, tuple[Encoded, bool]]) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    """The manifest entries {name: entry} and stored tensors {"<name>.<suffix>": tensor} of encoded deltas."""
    entries, tensors = {}, {}
    for name in sorted(encoded):
        enc, transposed = encoded[name]
        shape = list(enc.shape[::-1] if transposed else enc.shape)
        _, dtype = base_ck.slice_info(name)
        entries[name] = {"kind": enc.kind, "shape": shape, "dtype": dtype, "transposed": transposed,
                         "meta": enc.meta, "bytes": enc.nbytes,
                         "stats": {k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in enc.stats.items()}}
        for suffix, t in enc.tensors.items():
            tensors[f"{name}.{suffix}"] = t
    return entries, tensors


def encoded_from_entry(entry: dict, tensors: dict[str, torch.Tensor]) -> tuple[Encoded, bool]:
    """Inverse of encoded_entries for one entry (in-memory `detail` is not stored)."""
    shape = tuple(entry["shape"])
    transposed = bool(entry.get("transposed"))
    return Encoded(entry["kind"], shape[::-1] if transposed else shape, entry.get("meta", {}), dict(tensors),
                   dict(entry.get("stats", {}))), transposed


def build_manifest(base_fingerprint: str, finetune_config_fingerprint: str, entries: dict[str, dict],
                   dropped: list[str], settings: Settings, extra: dict) -> dict:
    """The manifest of an artifact holding `entries` (sizes of the files are filled in by write_artifact)."""
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "tool_version": __version__, "method": settings.method,
        "settings": {**asdict(settings), **extra}, "alpha": settings.alpha,
        "base_fingerprint": base_fingerprint, "finetune_config_fingerprint": finetune_config_fingerprint,
        "dropped": dropped,
        "sizes": size_totals(entries),
        "tensors": {name: entries[name] for name in sorted(entries)},
    }
