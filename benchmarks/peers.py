"""ADAMIX against its peers at the same size, on the two real pairs.

    python benchmarks/peers.py [--pairs minilm,smollm,smollm-code] [--ratios 1/8,1/16,1/32,1/64,1/128]
                               [--methods adamix,deltacome,...,impart+qt]
                               [--cli-methods all] [--out docs/results] [--work DIR] [--merge]

For each pair, one calibration pass (the CLI's defaults: 128 windows of <= 256 tokens of gensim's
lee_background.cor) feeds every method at every ratio: each delta's SVD and error tables are computed
once and shared, so the artifacts are exactly those `adamix compress --method M --ratio R` writes
(checked byte for byte on the CLI runs). Each artifact is written to WORK, then measured:
- relative output error on held-out text (never the calibration text), DESIGN.md section 2;
- end metrics of the restored model (`adamix merge`'s tensors, built in memory):
  MiniLM: mean cosine of mean-pooled embeddings to the fine-tune's (per corpus, averaged), Pearson
  correlation with the human ratings of gensim's Lee document similarity, polarity accuracy of a
  linear probe (5-fold cross-validation);
  SmolLM2: exact match on the fine-tune's task (200 test prompts), fraction of the fine-tune's gain
  kept, perplexity on the Lee documents;
- bytes on disk, achieved alpha; compute seconds (calibration + SVD + the method's own work, as a
  standalone run would spend them); and for the methods in --cli-methods a real `adamix compress`
  at 1/16 in a child process: its wall time and peak RSS.
Writes docs/results/<pair>.md and PNG plots (error vs ratio, widths heat map, spectra,
predicted vs measured error); names the commit of the code inside. With --merge, the rows of the
earlier <pair>.json that this run does not redo (other methods or ratios) are kept, each row with
the commit that produced it, so a long grid can be run in parts.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import re
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

from adamix.io.artifact import AtomicFolder, Artifact, write_artifact  # noqa: E402
from adamix.compression.calibrate import BlockRunner, token_windows  # noqa: E402
from adamix.io.text import default_calibration_file, read_text  # noqa: E402
from adamix.io.checkpoint import Checkpoint, config_fingerprint  # noqa: E402
from adamix.eval.heldout import (corpus_grams, embedding_cosine, errors_on_corpora, gensim_data,  # noqa: E402
                                 heldout_corpora, mean_pooled, polarity_labelled, pooled_grams)
from adamix.quant.linalg import svd  # noqa: E402
from adamix.export.merge import merged_state  # noqa: E402
from adamix.methods import ModelContext, get, names  # noqa: E402
from adamix.methods.kinds import stored_suffixes  # noqa: E402
from adamix.methods.adamix import analyse  # noqa: E402
from adamix.methods import Settings  # noqa: E402
from adamix.methods.bitdelta import BITDELTA_ALPHA  # noqa: E402
from adamix.methods.deltacome import deltacome_settings  # noqa: E402
from adamix.io.hf import build_model, state_name_map  # noqa: E402
from adamix.io.manifest import build_manifest, encoded_entries  # noqa: E402
from adamix.compression.encode import encode_tensor, row_sparse  # noqa: E402
from adamix.compression.plan import delta_of, is_svd_shape, overhead_per_element, pair_tensors  # noqa: E402

SVD_METHODS = {"adamix", "deltacome", "lowrank", "impart"}
DISTILLED = "bitdelta+distill"
VARIANTS = {"impart+qt": {"quantize": True}, "adamix+normal": {"grid": "normal"}}  # methods with options: Settings changes
DISTILL_STEPS = 100
ONE_16 = 1 / 16
t0 = time.time()


def ratio_name(alpha: float) -> str:
    return str(Fraction(alpha).limit_denominator(1024))


def fits(method: str, alpha: float) -> bool:
    return not (method.startswith("bitdelta") and alpha < BITDELTA_ALPHA)


def settings_of(method: str, alpha: float) -> Settings:
    """The Settings `adamix compress --method M` uses for a benchmark method name (variants included)."""
    return Settings(method=method.split("+")[0], alpha=alpha, **VARIANTS.get(method, {}))


# ---------------------------------------------------------------------------------------------
# Compression: every method x ratio from one calibration pass
# ---------------------------------------------------------------------------------------------

def compress_grid(base: str, ft: str, methods: list[str], ratios: list[float], work: Path, log=print) -> dict:
    """Write WORK/<method>-<ratio> for every pair (method, ratio); returns timings and in-memory details."""
    from transformers import AutoTokenizer
    base_ck, ft_ck = Checkpoint(base), Checkpoint(ft)
    names, dropped = pair_tensors(base_ck, ft_ck)
    overheads = {m: overhead_per_element(base_ck, names, max(len(stored_suffixes(k)) for k in get(m.split("+")[0]).kinds))
                 for m in methods}
    configs = [(m, a) for m in methods if m != DISTILLED for a in ratios if fits(m, a)]
    encoded = {c: {} for c in configs}
    own = {c: 0.0 for c in configs}          # seconds of the method's own work per config
    prep = {m: 0.0 for m in methods}         # seconds of the method's ratio-independent analysis
    shared = {"calibration": 0.0, "svd": 0.0}
    spectra, widths_map = {}, {}

    def encode_all(name: str, D: torch.Tensor, H: torch.Tensor | None, transposed: bool) -> None:
        if not bool(D.any()):
            return
        Dl = D.T if transposed else D
        pieces: dict = {m: {} for m in methods}
        fac = None
        if is_svd_shape(tuple(D.shape)):
            t = time.time()
            fac = svd(Dl)
            shared["svd"] += time.time() - t
            spectra[name] = fac[1].numpy()
            if "deltacome" in methods:
                t = time.time()
                pieces["deltacome"]["analysis"] = analyse(Dl, H, deltacome_settings(Settings()), factors=fac)
                prep["deltacome"] += time.time() - t
            for m in methods:
                if m.split("+")[0] in SVD_METHODS:
                    pieces[m]["factors"] = fac
        rows_cache = {}
        for m, a in configs:
            settings = settings_of(m, a)
            extra = dict(pieces[m])
            t = time.time()
            if m.split("+")[0] == "adamix" and fac is not None:  # the error table pruned for this ratio, as a standalone run
                if settings.whiten and H is not None and "whitened" not in pieces:
                    pieces["whitened"] = svd(Dl, H, True, settings.svd)  # adamix's own SVD (the default --whiten)
                whitened = settings.whiten and H is not None
                extra["analysis"] = analyse(Dl, H, settings, factors=pieces["whitened"] if whitened else fac, prune=True)
            if H is None and is_svd_shape(tuple(D.shape)):
                key = (min(a, BITDELTA_ALPHA) if m == "bitdelta" else a, overheads[m])
                if key not in rows_cache:
                    rows_cache[key] = row_sparse(D, settings, overheads[m])
                extra["rows"] = rows_cache[key]
            enc = encode_tensor(D, H, transposed, settings, overheads[m], **extra)
            own[(m, a)] += time.time() - t
            if enc is not None:
                encoded[(m, a)][name] = (enc, transposed)
                if m == "adamix" and "widths_by_index" in enc.detail:
                    widths_map.setdefault(a, {})[name] = enc.detail["widths_by_index"]

    calib = read_text(default_calibration_file())
    tokenizer = AutoTokenizer.from_pretrained(ft_ck.folder)
    windows = token_windows(calib, tokenizer, 128, 256)
    todo = set(names)
    t = time.time()
    runner = BlockRunner(ft_ck, windows)
    for i, infos, grams in runner.run():
        shared["calibration"] += time.time() - t
        for info in infos:
            if info.name in todo:
                # the float32 Gram, as the pipeline passes it: the CLI's artifacts must match byte for byte
                encode_all(info.name, delta_of(base_ck, ft_ck, info.name), grams[info.name], info.transposed)
                todo.discard(info.name)
        log(f"  block {i + 1}/{len(runner.blocks)} done ({time.time() - t0:.0f} s)")
        t = time.time()
    for name in sorted(todo):
        encode_all(name, delta_of(base_ck, ft_ck, name), None, False)

    if DISTILLED in methods and ("bitdelta", BITDELTA_ALPHA) in encoded:  # distills bitdelta's 1/16 artifact
        from adamix.methods.bitdelta import sign_matrix
        from adamix.methods.distill import distill_scales
        plain = encoded[("bitdelta", BITDELTA_ALPHA)]
        copy = {n: (dataclasses.replace(e, tensors=dict(e.tensors), stats=dict(e.stats)), tr) for n, (e, tr) in plain.items()}
        t = time.time()
        torch.manual_seed(0)
        ctx = ModelContext(teacher=lambda: build_model(ft_ck), student=lambda tensor: build_model(base_ck, tensor),
                           base_tensor=base_ck.get, param_names=lambda model: state_name_map(model, base_ck.keys()),
                           windows=windows, progress=False)
        distill_info = distill_scales(copy, ctx, DISTILL_STEPS, "bitdelta", sign_matrix)
        for a in ratios:
            if fits(DISTILLED, a):
                encoded[(DISTILLED, a)] = copy
                own[(DISTILLED, a)] = own[("bitdelta", a)] + time.time() - t
        prep[DISTILLED] = 0.0
        log(f"  distillation: {distill_info}")

    base_fp, ft_config_fp = base_ck.fingerprint(), config_fingerprint(ft_ck)
    for (m, a), enc in encoded.items():
        settings = settings_of(m, a) if m != DISTILLED else Settings(method="bitdelta", alpha=a)
        extra = {"calibration": "lee_background.cor", "samples": 128, "seqlen": 256, "device": "cpu", "seed": 0}
        if m == DISTILLED:
            extra.update({"distill_steps": DISTILL_STEPS, "distill": distill_info})
        entries, tensors = encoded_entries(enc, lambda n: base_ck.slice_info(n)[1])
        manifest = build_manifest(base_fp, ft_config_fp, entries, dropped, settings, extra)
        out = work / f"{m}-{ratio_name(a).replace('/', '_')}"
        with AtomicFolder(out, overwrite=True) as tmp:
            write_artifact(tmp, manifest, tensors, ft_ck.config_files())
    seconds = {}
    for (m, a) in encoded:
        base_m = m.split("+")[0]
        seconds[(m, a)] = (shared["calibration"] + (shared["svd"] if base_m in SVD_METHODS else 0.0)
                           + prep.get(base_m, 0.0) + own[(m, a)])
    return {"seconds": seconds, "shared": shared, "spectra": spectra, "widths": widths_map,
            "configs": list(encoded)}


def artifact_dir(work: Path, method: str, alpha: float) -> Path:
    return work / f"{method}-{ratio_name(alpha).replace('/', '_')}"


def cli_run(base: str, ft: str, method: str, out: Path) -> dict:
    """`adamix compress --method M --ratio 1/16` in a child process: wall time, peak RSS, bytes hash."""
    from core_numbers import run_compress
    flags = [f for k, v in VARIANTS.get(method, {}).items()
             for f in ([f"--{k.replace('_', '-')}"] if v is True else [f"--{k.replace('_', '-')}", str(v)])]
    r = run_compress(base, ft, out, "1/16", "--method", method.split("+")[0], *flags, "--overwrite")
    return {"wall_s": r["wall_s"], "peak_rss_mib": r["peak_rss_mib"], "sha": sha256(out / "delta.safetensors")}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# End metrics
# ---------------------------------------------------------------------------------------------

def restored_model(base: str, ft: str, art: Artifact | None):
    """The model `adamix merge` would write (in memory); art None: the base itself; 'ft': the fine-tune."""
    ft_ck = Checkpoint(ft)
    if art is None:
        return build_model(ft_ck, Checkpoint(base).get)
    state = merged_state(Checkpoint(base), art)
    return build_model(ft_ck, state.__getitem__)


def probe_accuracy(X: np.ndarray, y: np.ndarray, folds: int = 5, l2: float = 1.0) -> float:
    """5-fold cross-validated accuracy of an L2-regularised logistic regression on X (N, d)."""
    from scipy.optimize import minimize
    idx = np.arange(len(y))
    correct = 0
    for f in range(folds):
        test, train = idx[idx % folds == f], idx[idx % folds != f]
        mu, sd = X[train].mean(0), X[train].std(0) + 1e-8
        A = np.c_[(X[train] - mu) / sd, np.ones(len(train))]
        t = y[train] * 2 - 1

        def loss(w):
            z = t * (A @ w)
            return np.logaddexp(0, -z).sum() + 0.5 * l2 * (w[:-1] ** 2).sum(), \
                A.T @ (-t / (1 + np.exp(z))) + l2 * np.r_[w[:-1], 0]
        w = minimize(loss, np.zeros(A.shape[1]), jac=True, method="L-BFGS-B").x
        B = np.c_[(X[test] - mu) / sd, np.ones(len(test))]
        correct += int(((B @ w > 0).astype(int) == y[test]).sum())
    return correct / len(y)


def lee_pearson(emb: torch.Tensor) -> float:
    """Pearson correlation of cosine similarities with the human ratings (upper triangle, 50 docs)."""
    human = np.loadtxt(gensim_data("similarities0-1.txt"))
    e = torch.nn.functional.normalize(emb.double(), dim=1)
    sim = (e @ e.T).numpy()
    iu = np.triu_indices(len(human), 1)
    return float(np.corrcoef(human[iu], sim[iu])[0, 1])


class MiniLMMetrics:
    def __init__(self, ft: str):
        self.ft = ft
        self.lee = heldout_corpora()["lee"]
        self.pol, labels = polarity_labelled()
        self.labels = np.array(labels)
        ft_model = build_model(Checkpoint(ft))
        self.ref = {k: mean_pooled(ft, t, model=ft_model) for k, t in (("lee", self.lee), ("polarity", self.pol))}

    def __call__(self, model) -> dict:
        emb = {k: mean_pooled(self.ft, t, model=model) for k, t in (("lee", self.lee), ("polarity", self.pol))}
        cos = {k: embedding_cosine(emb[k], self.ref[k]) for k in emb}
        return {"cosine": (cos["lee"] + cos["polarity"]) / 2, "lee_pearson": lee_pearson(emb["lee"]),
                "probe_acc": probe_accuracy(emb["polarity"].numpy(), self.labels)}


def smollm_task(pair: str) -> str:
    """The fine-tune task of a SmolLM2 pair: smollm = word reversal, smollm-code = the word code."""
    from make_smollm_finetune import CODE_TASK_ID, TASK_ID
    return CODE_TASK_ID if pair == "smollm-code" else TASK_ID


class SmolLMMetrics:
    def __init__(self, ft: str, task: str):
        from transformers import AutoTokenizer
        from make_smollm_finetune import task_examples
        self.tok = AutoTokenizer.from_pretrained(ft)
        self.examples = task_examples("test", 200, seed=0, task=task)
        self.lee = heldout_corpora()["lee"]

    def __call__(self, model) -> dict:
        from make_smollm_finetune import exact_match
        with torch.no_grad():
            acc = exact_match(model, self.tok, self.examples)
            nll = count = 0.0
            for doc in self.lee:
                ids = self.tok(doc, return_tensors="pt").input_ids[:, :256]
                out = model(input_ids=ids, labels=ids)
                nll += float(out.loss) * (ids.shape[1] - 1)
                count += ids.shape[1] - 1
        return {"exact_match": acc, "ppl_lee": math.exp(nll / count)}


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def plots(pair: str, rows: list[dict], grid: dict, out: Path, ratios: list[float], methods: list[str],
          pred_meas: list[tuple[float, float]]) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    files = []

    def save(fig, what: str) -> None:
        fig.tight_layout()
        files.append(f"{pair}_{what}.png")
        fig.savefig(out / files[-1], dpi=110)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for m in methods:
        pts = sorted((r["alpha"], r["heldout_error"]) for r in rows if r["method"] == m)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ratios, [ratio_name(a) for a in ratios])
    ax.set(xlabel="alpha (compressed / fp16 delta)", ylabel="held-out relative output error", title=f"{pair}: error vs ratio")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, "error_vs_ratio")

    if ONE_16 in grid["widths"]:
        wmap = grid["widths"][ONE_16]
        names = [n for n in wmap]  # calibrated block order
        width = max(len(w) for w in wmap.values())
        shown = min(width, 128)
        img = np.full((len(names), shown), np.nan)
        for i, n in enumerate(names):
            w = np.asarray(wmap[n], dtype=float)[:shown]
            img[i, :len(w)] = w
        fig, ax = plt.subplots(figsize=(8, max(3, len(names) * 0.06 + 1.5)))
        im = ax.imshow(img, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=8)
        ax.set_xlabel(f"singular index (first {shown})")
        ax.set_ylabel("tensor (block order)")
        step = max(1, len(names) // 24)
        ax.set_yticks(range(0, len(names), step), [short(names[i]) for i in range(0, len(names), step)], fontsize=5)
        fig.colorbar(im, ax=ax, label="bits (0 = dropped)")
        ax.set_title(f"{pair}: adamix bit-widths at 1/16")
        save(fig, "widths_heatmap")

    spectra = grid["spectra"]
    picks = [n for n in spectra if ".0." in n or f".{max_block(spectra)}." in n][:8]
    fig, ax = plt.subplots(figsize=(6, 4))
    for n in picks:
        s = spectra[n]
        ax.plot(np.arange(1, len(s) + 1), s / s[0], label=short(n), lw=1)
    ax.set(xscale="log", yscale="log", xlabel="singular index", ylabel="s_i / s_1", title=f"{pair}: singular spectra of deltas")
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    save(fig, "spectra")

    if pred_meas:
        p, mm = np.array(pred_meas).T
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.scatter(p, mm, s=6)
        lim = [0, max(p.max(), mm.max()) * 1.05]
        ax.plot(lim, lim, "k--", lw=0.8)
        ax.set_xlabel("predicted relative error (ILP model)")
        ax.set_ylabel("measured relative error (after GPTQ)")
        ax.set_title(f"{pair}: adamix per tensor, 1/16")
        save(fig, "predicted_vs_measured")
    return files


def max_block(spectra: dict) -> int:
    nums = [int(x) for n in spectra for x in re.findall(r"\.(\d+)\.", n)]
    return max(nums) if nums else 0


def short(name: str) -> str:
    return re.sub(r"^(model\.|encoder\.|bert\.)", "", name).replace("layers.", "L").replace("layer.", "L").removesuffix(".weight")


def fmt(v, nd=4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


@functools.cache
def git_commit() -> str:
    """The commit of the code (taken once, when the run starts: main() calls it first), of this
    script's checkout whatever the working directory."""
    here = Path(__file__).parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=here).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                               cwd=here).stdout.strip()
        return rev + ("+uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ---------------------------------------------------------------------------------------------

def run_pair(pair: str, methods: list[str], ratios: list[float], cli_methods: list[str], work: Path, out: Path,
             merge: bool = False) -> None:
    from adamix.eval.demo import PAIR, package_folder
    if pair == "minilm":
        base, ft = (package_folder(*p) for p in PAIR)
        base_for_cli = base
        title = "all-MiniLM-L6-v2 -> sre-embedding-model"
        metrics = MiniLMMetrics(ft)
    else:
        from make_smollm_finetune import gguf_location, make_finetune
        folder, name = gguf_location()
        base, ft = make_finetune(log=print, task=smollm_task(pair))
        base_for_cli = str(Path(folder) / name)
        title = f"SmolLM2-135M-Instruct (GGUF) -> its {'word-code' if pair == 'smollm-code' else 'word-reversal'} fine-tune"
        metrics = SmolLMMetrics(ft, smollm_task(pair))
    work = work / pair
    work.mkdir(parents=True, exist_ok=True)
    print(f"[{pair}] compressing {len(methods)} methods x {len(ratios)} ratios")
    grid = compress_grid(base, ft, methods, ratios, work)
    print(f"[{pair}] held-out Grams")
    by_corpus = corpus_grams(ft, heldout_corpora())  # every window of every held-out corpus
    grams = pooled_grams(by_corpus)
    ref = {"base": metrics(restored_model(base, ft, None)), "finetune": metrics(build_model(Checkpoint(ft)))}
    print(f"[{pair}] references {ref}")
    rows = []
    for (m, a) in grid["configs"]:
        art = Artifact(artifact_dir(work, m, a))
        sizes = art.manifest["sizes"]
        held = errors_on_corpora(base, ft, art, by_corpus, grams)
        r = {"method": m, "alpha": a, "heldout_error": held["pooled"],
             **{f"heldout_{c}": e for c, e in held["per_corpus"].items()},
             "bytes": sizes["total_bytes"], "alpha_achieved": sizes["alpha_achieved"],
             "compute_s": grid["seconds"][(m, a)], "commit": git_commit(), **metrics(restored_model(base, ft, art))}
        rows.append(r)
        print(f"[{pair}] {m} {ratio_name(a)}: " + ", ".join(f"{k}={fmt(v)}" for k, v in r.items() if k not in ("method", "alpha")))
    if merge and (out / f"{pair}.json").is_file():
        old = json.loads((out / f"{pair}.json").read_text())
        rows, ratios, methods = merged(old, rows, ratios, methods)
    pred_meas = []
    if (artifact_dir(work, "adamix", ONE_16) / "manifest.json").is_file() and \
            any(r["method"] == "adamix" and r["alpha"] == ONE_16 for r in rows):  # this run's or a merged one's
        art = Artifact(artifact_dir(work, "adamix", ONE_16))
        pred_meas = [(e["stats"]["error_predicted"], e["stats"]["error_measured"])
                     for n, e in art.entries.items() if e["kind"] == "svd-mixed" and n in grams]
    cli = {}
    for m in cli_methods:
        if m in methods and m != DISTILLED:
            cli[m] = cli_run(base_for_cli, ft, m, work / f"cli-{m}")
            cli[m]["identical"] = cli[m]["sha"] == sha256(artifact_dir(work, m, ONE_16) / "delta.safetensors")
            print(f"[{pair}] CLI {m} 1/16: {cli[m]}")
    if merge and not cli and (out / f"{pair}.json").is_file():
        cli = json.loads((out / f"{pair}.json").read_text()).get("cli", {})  # the earlier run's, kept
    write_report(pair, title, rows, ref, grid, cli, ratios, methods, pred_meas, out)


def merged(old: dict, rows: list[dict], ratios: list[float], methods: list[str]):
    """(rows, ratios, methods) of this run joined with an earlier run's rows of other (method, ratio)."""
    done = {(r["method"], r["alpha"]) for r in rows}
    kept = [{**r, "commit": r.get("commit", old["commit"])} for r in old["rows"] if (r["method"], r["alpha"]) not in done]
    ratios = sorted(set(ratios) | {r["alpha"] for r in kept}, reverse=True)
    methods = list(dict.fromkeys([r["method"] for r in old["rows"]] + methods))  # the earlier run's order first
    return rows + kept, ratios, methods


def write_report(pair, title, rows, ref, grid, cli, ratios, methods, pred_meas, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{pair}.json").write_text(json.dumps({"commit": git_commit(), "rows": rows, "references": ref, "cli": cli,
                                                   "shared": grid["shared"]}, indent=1, default=float))
    files = plots(pair, rows, grid, out, ratios, methods, pred_meas)
    files += sorted(f.name for f in out.glob(f"{pair}_*.png") if f.name not in files and ONE_16 not in grid["widths"]
                    and any(r["alpha"] == ONE_16 for r in rows))  # 1/16's plots of a merged earlier run
    by_corpus = sorted({k for r in rows for k in r if k.startswith("heldout_") and k != "heldout_error"})
    end_keys = [k for k in rows[0] if k not in ("method", "alpha", "heldout_error", "bytes", "alpha_achieved", "compute_s",
                                                 "commit", *by_corpus)]
    lines = [f"# {title}", "", f"Produced by `python {' '.join(sys.argv)}` at commit `{git_commit()}`, "
             f"CPU. Calibration: 128 windows of <= 256 tokens of lee_background.cor; held-out error on every window "
             "of the Lee documents and the polarity sentences, pooled (every token weighing the same), and per corpus"
             + ("" if all(k in r for r in rows for k in by_corpus) else " (rows merged from runs before that measure: " +
                ("Lee + polarity, first 64 windows" if pair == "minilm" else "Lee, first 32 windows") +
                ", without per-corpus figures)") + ".", ""]
    by_commit = {}
    for r in rows:
        by_commit.setdefault(r.get("commit", git_commit()), set()).add(r["alpha"])
    if len(by_commit) > 1:
        lines += ["Rows merged from runs at several commits (`--merge`), each ratio's rows from:", ""]
        lines += [f"- `{c}`: " + ", ".join(ratio_name(a) for a in sorted(al, reverse=True)) +
                  ("" if all(r.get("commit", git_commit()) == c for r in rows if r["alpha"] in al) else " (some methods)")
                  for c, al in by_commit.items()]
        lines += ["", "The `compute s` and shared-work figures of different commits come from different runs.", ""]
    lines += ["## References", "", "| model | " + " | ".join(end_keys) + " |", "|---|" + "---|" * len(end_keys)]
    for k, v in ref.items():
        lines.append(f"| {k} | " + " | ".join(fmt(v[e]) for e in end_keys) + " |")
    if pair != "minilm":
        lines += ["", "gain kept = (exact_match - base) / (fine-tune - base)."]
    lines += ["", "## Every method at every ratio", ""]
    head = ["method", "held-out error", "x deltacome", "x adamix"] + [k.replace("heldout_", "held-out ") for k in by_corpus] + \
        end_keys + \
        (["gain kept"] if pair != "minilm" else []) + ["bytes", "alpha achieved", "budget used", "compute s"]
    for a in ratios:
        lines += [f"### alpha = {ratio_name(a)}", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        dc = next((r["heldout_error"] for r in rows if r["method"] == "deltacome" and r["alpha"] == a), None)
        ax = next((r["heldout_error"] for r in rows if r["method"] == "adamix" and r["alpha"] == a), None)
        for m in methods:
            r = next((r for r in rows if r["method"] == m and r["alpha"] == a), None)
            if r is None:
                lines.append(f"| {m} | does not fit (1 bit per weight = 1/16) |" + " |" * (len(head) - 2))
                continue
            vals = [m, fmt(r["heldout_error"]), fmt(r["heldout_error"] / dc, 3) if dc else "-",
                    fmt(r["heldout_error"] / ax, 3) if ax else "-"] + [fmt(r.get(k)) for k in by_corpus] + \
                [fmt(r[k]) for k in end_keys]
            if pair != "minilm":
                gain = (r["exact_match"] - ref["base"]["exact_match"]) / (ref["finetune"]["exact_match"] - ref["base"]["exact_match"])
                vals.append(fmt(gain, 3))
            vals += [fmt(r["bytes"]), fmt(r["alpha_achieved"], 4), fmt(r["alpha_achieved"] / a, 3), fmt(r["compute_s"], 3)]
            lines.append("| " + " | ".join(vals) + " |")
        lines.append("")
    if cli:
        lines += ["## `adamix compress --ratio 1/16` in a child process", "",
                  "| method | wall s | peak RSS MiB | artifact identical to the grid's |", "|---|---|---|---|"]
        for m, c in cli.items():
            lines.append(f"| {m} | {c['wall_s']:.1f} | {c['peak_rss_mib']:.0f} | {'yes' if c['identical'] else 'NO'} |")
        lines.append("")
    sh = grid["shared"]
    lines += [f"Shared work: calibration {sh['calibration']:.1f} s, SVDs {sh['svd']:.1f} s (counted in `compute s` of the "
              "methods that use them).", ""]
    if pred_meas:
        p, mm = np.array(pred_meas).T
        lines += ["## Predicted (ILP error model) vs measured error, adamix at 1/16, per tensor", "",
                  f"{len(p)} calibrated tensors; on the calibration text. median measured/predicted "
                  f"{np.median(mm / np.maximum(p, 1e-12)):.3f}, range {np.min(mm / np.maximum(p, 1e-12)):.3f}.."
                  f"{np.max(mm / np.maximum(p, 1e-12)):.3f}, Pearson r {np.corrcoef(p, mm)[0, 1]:.3f}.", ""]
    lines += ["## Plots", ""] + [f"![{f}]({f})" for f in files] + [""]
    (out / f"{pair}.md").write_text("\n".join(lines))
    print(f"[{pair}] wrote {out / (pair + '.md')}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", default="minilm,smollm")
    ap.add_argument("--ratios", default="1/8,1/16,1/32,1/64,1/128")
    ap.add_argument("--methods", default=",".join(names()) + f",{DISTILLED}," + ",".join(VARIANTS))
    ap.add_argument("--cli-methods", default="all", help="methods also timed as a real CLI run at 1/16 ('none' to skip)")
    ap.add_argument("--cli-only", action="store_true", help="only redo the CLI timings of an earlier run")
    ap.add_argument("--reuse-cli", action="store_true", help="with --cli-only: take the timings saved by an earlier "
                    "--cli-only run (cli-M/timing.json in WORK) instead of running again")
    ap.add_argument("--merge", action="store_true", help="keep the earlier <pair>.json's rows of the methods and "
                    "ratios this run does not redo")
    ap.add_argument("--out", default=str(Path(__file__).parent.parent / "docs" / "results"))
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "adamix" / "bench" / "peers"))
    args = ap.parse_args()
    git_commit()
    methods = args.methods.split(",")
    ratios = [float(Fraction(r)) for r in args.ratios.split(",")]
    cli = [] if args.cli_methods == "none" else (methods if args.cli_methods == "all" else args.cli_methods.split(","))
    for pair in args.pairs.split(","):
        if args.cli_only:
            rerun_cli(pair, cli, Path(args.work), Path(args.out), args.reuse_cli)
        else:
            run_pair(pair, methods, ratios, cli, Path(args.work), Path(args.out), args.merge)


def rerun_cli(pair: str, methods: list[str], work: Path, out: Path, reuse: bool = False) -> None:
    """Redo only the CLI timings of an earlier run (its artifacts in WORK) and rewrite that section.
    Each run's timing is saved beside its artifact (cli-M/timing.json); reuse=True takes those."""
    if pair == "minilm":
        from adamix.eval.demo import PAIR, package_folder
        base, ft = (package_folder(*p) for p in PAIR)
    else:
        from make_smollm_finetune import gguf_location, make_finetune
        folder, name = gguf_location()
        base, ft = str(Path(folder) / name), make_finetune(log=print, task=smollm_task(pair))[1]
    cli = {}
    for m in methods:
        if m != DISTILLED:
            saved = work / pair / f"cli-{m}" / "timing.json"
            if reuse and saved.is_file():  # measured earlier (e.g. while the grid was still evaluating)
                cli[m] = json.loads(saved.read_text())
            else:
                cli[m] = cli_run(base, ft, m, work / pair / f"cli-{m}")
                saved.write_text(json.dumps(cli[m]))
            cli[m]["identical"] = cli[m]["sha"] == sha256(artifact_dir(work / pair, m, ONE_16) / "delta.safetensors")
            print(f"[{pair}] CLI {m} 1/16: {cli[m]}")
    data = json.loads((out / f"{pair}.json").read_text())
    commit = git_commit()
    data["cli"], data["cli_commit"] = cli, commit
    (out / f"{pair}.json").write_text(json.dumps(data, indent=1, default=float))
    table = ["## `adamix compress --ratio 1/16` in a child process", "",
             f"Rerun with `--cli-only` at commit `{commit}`.", "",
             "| method | wall s | peak RSS MiB | artifact identical to the grid's |", "|---|---|---|---|"]
    table += [f"| {m} | {c['wall_s']:.1f} | {c['peak_rss_mib']:.0f} | {'yes' if c['identical'] else 'NO'} |" for m, c in cli.items()]
    text = (out / f"{pair}.md").read_text()
    section = re.compile(r"## `adamix compress --ratio 1/16` in a child process\n.*?\n\n(?=Shared work)", re.S)
    if section.search(text):
        text = section.sub(lambda _: "\n".join(table) + "\n\n", text)
    else:  # the grid ran with --cli-methods none: the section goes before "Shared work"
        text = text.replace("Shared work", "\n".join(table) + "\n\nShared work", 1)
    (out / f"{pair}.md").write_text(text)


if __name__ == "__main__":
    main()
