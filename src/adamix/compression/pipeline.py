"""The compression pipeline: pair the tensors of base and fine-tune, check, calibrate block by block,
encode each delta with the method, run the method's whole-model step if it has one, and write the
artifact atomically."""

from __future__ import annotations

import functools
import hashlib
import os
import resource
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from .. import timing
from ..errors import AdamixError
from ..io.artifact import AtomicFolder, prepare_output, write_artifact
from ..io.checkpoint import Checkpoint, config_fingerprint
from ..io.hf import build_model, state_name_map
from ..io.manifest import FORMAT_VERSION, build_manifest, encoded_entries, encoded_from_entry
from ..io.text import default_calibration_file, read_text
from ..io.vocab import add_new_rows
from ..memory import release_freed_memory
from ..threads import available_cores, compute_threads, default_threads
from ..methods import Encoded, ModelContext, get
from ..methods.kinds import stored_suffixes
from ..version import __version__
from .encode import encode_block, encode_tensor
from .options import Options
from .partial import PartialRun, block_chunk, rest_chunk
from .plan import delta_of, overhead_per_element, pair_tensors
from .shards import parse_shard, share, write_shard
from .preflight import check_before_calibration


def compress(base: str | os.PathLike, finetuned: str | os.PathLike, out: str | os.PathLike, **options) -> dict:
    """Compress `finetuned` against `base` and write the artifact folder `out`; `options` are the
    fields of compression.options.Options (method, ratio, calib, ...; e.g. ratio="1/16").

    calib: a text file, "default" (gensim's lee_background.cor) or None (data-free: H = I, RTN).
    Work is written block by block to a hidden sibling of `out` (partial.PartialRun); resume=True
    continues an interrupted run from there, with a byte-identical result. `out` appears only
    complete. Returns the manifest that was written, plus (not in the file) "seconds_by_phase".
    """
    t0 = time.time()
    timing.reset()
    opts = Options.from_kwargs(options)
    settings = opts.settings()
    if opts.executor != "local":
        raise AdamixError(f"compression.pipeline runs --executor local; {opts.executor} runs through adamix.compress")
    method = get(settings.method)
    model_step = method.whole_model_step(opts)
    out = prepare_output(out, opts.overwrite)
    torch.manual_seed(opts.seed)
    base_ck, ft_ck = Checkpoint(base), Checkpoint(finetuned)
    names, dropped = pair_tensors(base_ck, ft_ck)
    overhead = overhead_per_element(base_ck, names, max(len(stored_suffixes(k)) for k in method.kinds))
    check_before_calibration(base_ck, ft_ck, names, settings, overhead, opts.ratio, opts.distill_steps,
                             opts.calib is not None)
    calib_path = None
    if opts.calib is not None:
        calib_path = default_calibration_file() if str(opts.calib) == "default" else Path(opts.calib)
        text = read_text(calib_path)
    extra = {"calibration": str(calib_path.name) if calib_path else None, **opts.run_record()}
    with timing.phase("fingerprints"):
        fingerprints = {"base": base_ck.fingerprint(), "finetune": ft_ck.fingerprint(),
                        "finetune_config": config_fingerprint(ft_ck)}
    key = {"tool_version": __version__, "format_version": FORMAT_VERSION, "settings": asdict(settings), **extra,
           "calibration_sha256": hashlib.sha256(text.encode()).hexdigest() if calib_path else None, **fingerprints}
    shard = parse_shard(opts.shard)
    work = PartialRun(out, {**key, "shard": list(shard)} if shard else key, resume=opts.resume, overwrite=opts.overwrite)
    dtype_of = lambda name: base_ck.slice_info(name)[1]  # noqa: E731
    device = torch.device(opts.device)
    on_gpu = device.type == "cuda" and method.device_resident
    shared = settings.budget_scope != "tensor" and method.joint
    staged = calib_path is not None and method.staged and not shared
    threads, ilp_workers = cpu_plan(opts.threads, on_gpu, staged)
    # the work folder is removed at the end, or on bad input found midway; an interruption keeps it for --resume
    with compute_threads(threads), work:
        todo = set(names)
        for chunk in work.chunks():
            todo.difference_update(work.done(chunk)["names"])
        load = functools.partial(delta_of, base_ck, ft_ck)

        def store(chunk: str, covered: list[str], encoded: dict[str, tuple[Encoded, bool]]) -> None:
            add_new_rows(encoded, base_ck, ft_ck, covered, settings.group_size)
            entries, tensors = encoded_entries(encoded, dtype_of)
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
            windows = token_windows(text, tokenizer, opts.samples, opts.seqlen)
            if settings.budget_scope == "model" and shared:
                from .model_scope import Run, compress_model_scope
                from .preflight import calibrated_names
                calibrated = calibrated_names(ft_ck, names)
                extra.update(compress_model_scope(Run(
                    work, load, lambda: BlockRunner(ft_ck, windows, opts.device, grams_on_device=on_gpu),
                    [n for n in names if n not in calibrated], store, lambda: build_model(ft_ck, device=opts.device),
                    lambda model: state_name_map(model, ft_ck.keys()), windows, set(names), settings, overhead,
                    device, opts.seed, opts.progress, float(opts.slope_power), opts.uses_token_rows)))
            else:
                runner = BlockRunner(ft_ck, windows, opts.device, grams_on_device=on_gpu)
                mine = share(len(runner.blocks), shard) if shard else range(len(runner.blocks))
                skip = frozenset(i for i in range(len(runner.blocks)) if i not in mine or work.done(block_chunk(i)))
                bar = tqdm(runner.run(skip, stop=mine.stop), total=len(mine), initial=len(set(mine) & skip),
                           desc="calibrate+compress blocks", disable=not opts.progress, unit="block")
                for i, infos, grams in bar:
                    block = {info.name: (grams.pop(info.name), info.transposed) for info in infos if info.name in todo}
                    grams.clear()  # the runner's dict: emptied so that each Gram is freed once its linears are done
                    store(block_chunk(i), list(block), encode_block(block, load, settings, overhead, ilp_workers, device))
                    del block
        rest = sorted(todo)
        if shard:  # this shard's contiguous share of the data-free tensors (the blocks' linears are never among them)
            data_free = sorted(set(names) - (runner.linear_names() if windows is not None else set()))
            rest = [n for n in (data_free[i] for i in share(len(data_free), shard)) if n in todo]
        for name in tqdm(rest, desc="compress other tensors (data-free)", disable=not opts.progress or not rest, unit="tensor"):
            enc = encode_tensor(load(name), None, False, settings, overhead, device=device)
            store(rest_chunk(name), [name], {name: (enc, False)} if enc is not None else {})
            release_freed_memory()

        if shard:
            covered = sorted({n for chunk in work.chunks() for n in work.done(chunk)["names"]})
            manifest_inputs = {"base_fingerprint": fingerprints["base"], "finetune_config_fingerprint":
                               fingerprints["finetune_config"], "dropped": dropped, "settings": asdict(settings),
                               "extra": extra}
            with timing.phase("write"):
                write_shard(out, opts.overwrite, work, key, shard, names, covered, manifest_inputs, ft_ck.config_files())
            return {"shard": list(shard), "covered": covered, "sizes": {"wall_seconds": round(time.time() - t0, 2),
                    "peak_rss_mib": round(peak_rss_mib(), 1), "threads": threads, "ilp_workers": ilp_workers},
                    "seconds_by_phase": timing.snapshot(), "resumed_chunks": len(work.resumed)}
        entries = work.entries()
        sources: dict[str, torch.Tensor | Path] = dict(work.tensor_files())
        if model_step is not None:
            stored = work.read(list(sources))
            encoded = {n: encoded_from_entry(e, {s: stored[f"{n}.{s}"] for s in stored_suffixes(e["kind"])})
                       for n, e in entries.items()}
            torch.manual_seed(opts.seed)
            extra.update(model_step(encoded, model_context(base_ck, ft_ck, windows, opts)))
            entries, tensors = encoded_entries(encoded, dtype_of)
            sources = dict(tensors)
        manifest = build_manifest(fingerprints["base"], fingerprints["finetune_config"], entries, dropped, settings, extra)
        with timing.phase("write"), AtomicFolder(out, opts.overwrite, within=work.folder) as tmp:
            write_artifact(tmp, manifest, sources, ft_ck.config_files())
    manifest["sizes"]["wall_seconds"] = round(time.time() - t0, 2)
    manifest["sizes"]["peak_rss_mib"] = round(peak_rss_mib(), 1)
    manifest["sizes"]["threads"] = threads
    manifest["sizes"]["ilp_workers"] = ilp_workers
    manifest["seconds_by_phase"] = timing.snapshot()
    manifest["resumed_chunks"] = len(work.resumed)
    return manifest


MAX_ILP_WORKERS = 2  # on the CPU: each worker holds one more matrix's factors in memory
MAX_ILP_WORKERS_GPU = 4  # with the linear algebra on a GPU: the factors wait in the device's memory


def cpu_plan(threads: int | None, on_gpu: bool, staged: bool) -> tuple[int, int]:
    """(torch's CPU threads, ILP worker threads) for a run; together never more than the cores.

    CPU: `threads` (default: default_threads()) for the linear algebra; the ILPs of calibrated
    matrices (a staged method, compression.encode) run in worker threads on the cores left, at most
    MAX_ILP_WORKERS. GPU: the linear algebra runs on the device, so the ILP workers come first (up to
    MAX_ILP_WORKERS_GPU, one core kept for the main thread) and torch's threads get the rest.
    """
    cores = available_cores()
    if on_gpu and staged:
        threads = threads or max(1, cores - min(MAX_ILP_WORKERS_GPU, cores - 1))
        return threads, max(0, min(MAX_ILP_WORKERS_GPU, cores - threads))
    threads = threads or default_threads()
    return threads, max(0, min(MAX_ILP_WORKERS, cores - threads)) if staged else 0


def model_context(base_ck: Checkpoint, ft_ck: Checkpoint, windows: list[torch.Tensor] | None, opts: Options) -> ModelContext:
    """The models a whole-model step may build: the fine-tune, and the base with tensors replaced."""
    return ModelContext(teacher=lambda: build_model(ft_ck, device=opts.device),
                        student=lambda tensor: build_model(base_ck, tensor, opts.device),
                        base_tensor=base_ck.get, param_names=lambda model: state_name_map(model, base_ck.keys()),
                        windows=windows or [], device=opts.device, progress=opts.progress)


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
