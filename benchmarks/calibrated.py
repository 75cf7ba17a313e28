"""The real pairs' calibrated deltas, one at a time, for the analysis benchmarks (ablation, pruning)."""

from __future__ import annotations

import argparse
import subprocess
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import torch

from adamix.compression.calibrate import BlockRunner, token_windows
from adamix.io.text import default_calibration_file, read_text
from adamix.io.checkpoint import Checkpoint
from adamix.compression.plan import delta_of


def pair_paths(pair: str) -> tuple[str, str]:
    """(base, fine-tune) folders of 'minilm' (the packaged pair) or 'smollm' (made and cached)."""
    if pair == "minilm":
        from adamix.eval.demo import PAIR, package_folder
        return tuple(package_folder(*p) for p in PAIR)
    from make_smollm_finetune import make_finetune
    return make_finetune(log=print)


def calibrated_deltas(base: str, ft: str, samples: int, blocks: int = 0) -> Iterator[tuple[int, str, torch.Tensor, torch.Tensor]]:
    """(block, name, D (m x n, oriented so that y = D x), float32 Gram H (n x n)) for every linear of
    the first `blocks` blocks (0: all), Grams from `samples` windows of 256 tokens of lee_background.cor."""
    from transformers import AutoTokenizer
    base_ck, ft_ck = Checkpoint(base), Checkpoint(ft)
    windows = token_windows(read_text(default_calibration_file()), AutoTokenizer.from_pretrained(ft), samples, 256)
    for i, infos, grams in BlockRunner(ft_ck, windows).run():
        if blocks and i >= blocks:
            break
        for info in infos:
            D = delta_of(base_ck, ft_ck, info.name)
            yield i, info.name, D.T if info.transposed else D, grams[info.name]


def pair_arguments(description: str, ratios: str) -> tuple[argparse.Namespace, list[float], str]:
    """The analysis benchmarks' command line (--pair, --ratios, --blocks, --samples, --out), the ratios
    as numbers, and the commit of the code that runs (read at the start)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--pair", default="minilm", choices=("minilm", "smollm"))
    ap.add_argument("--ratios", default=ratios)
    ap.add_argument("--blocks", type=int, default=0, help="only the first N blocks (0 = all)")
    ap.add_argument("--samples", type=int, default=128, help="calibration windows of 256 tokens")
    ap.add_argument("--out", default=str(Path(__file__).parent.parent / "docs" / "results"))
    args = ap.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    return args, [float(Fraction(r)) for r in args.ratios.split(",")], commit
