"""docs/adding-a-method.md, run: its toy method (one file plus one registration line) works through
the command line, the artifact, merge and inspect, with nothing else changed."""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import adamix
from adamix.cli import build_parser, main
from adamix.io.checkpoint import Checkpoint
from adamix.methods import kinds, registry

DOC = Path(__file__).parents[2] / "docs" / "adding-a-method.md"


def doc_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


@pytest.fixture
def toy(tmp_path):
    """The doc's module, imported as adamix.methods.topk (what its registration line does)."""
    source, registration = doc_blocks()[:2]
    assert registration.strip().startswith("from . import topk")
    path = tmp_path / "topk.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("adamix.methods.topk", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    try:
        yield module
    finally:
        registry.unregister("topk")
        for table in (kinds.DECODERS, kinds.SUFFIXES):
            table.pop("topk-sparse", None)
        sys.modules.pop(spec.name, None)


def test_the_toy_method_end_to_end(toy, llama_pair, calib_file, tmp_path, capsys):
    base, ft = llama_pair
    compress = build_parser()._subparsers._group_actions[0].choices["compress"]
    assert "topk" in next(a for a in compress._actions if a.dest == "method").choices
    out = tmp_path / "d"
    assert main(["compress", str(base), str(ft), "-o", str(out), "--method", "topk", "--ratio", "1/8",
                 "--calib", str(calib_file), "--samples", "4", "--seqlen", "32", "-q"]) == 0
    art = adamix.load(out)
    assert art.manifest["method"] == "topk"
    matrices = {n: e for n, e in art.entries.items() if e["kind"] == "topk-sparse"}
    assert matrices, "the toy method stored nothing"
    assert art.manifest["sizes"]["alpha_achieved"] <= 1 / 8  # every stored bit counted, the ratio met
    stored = load_file(str(out / "delta.safetensors"))
    base_ck, ft_ck = Checkpoint(base), Checkpoint(ft)
    for name, e in matrices.items():
        k = e["stats"]["kept"]
        assert stored[f"{name}.idx"].numel() == k and 48 * k <= 16 * math.prod(e["shape"]) / 8
        D = (ft_ck.get(name).double() - base_ck.get(name).double()).flatten()
        kept = stored[f"{name}.idx"].long()
        # the kept entries are the largest ones, stored to fp16 precision; everything else is zero
        assert D.abs()[kept].min() >= D.abs().sort(descending=True).values[k - 1] - 1e-12
        Dhat = art.delta(name).double().flatten()
        assert torch.allclose(Dhat[kept], D[kept], rtol=1e-3, atol=1e-6)
        assert int((Dhat != 0).sum()) <= k
    assert main(["merge", str(base), str(out), "-o", str(tmp_path / "m"), "-q"]) == 0
    merged = Checkpoint(tmp_path / "m")
    name = sorted(matrices)[0]
    want = (base_ck.get(name).float() + art.delta(name)).to(base_ck.get(name).dtype)
    assert torch.equal(merged.get(name), want)
    assert main(["inspect", str(out)]) == 0
    assert "topk-sparse" in capsys.readouterr().out


def test_a_damaged_toy_artifact_is_refused_in_one_line(toy):
    """The doc's decoder checks what it reads, as every decoder must."""
    bad = {"idx": torch.tensor([0, 99], dtype=torch.int32), "val": torch.ones(2, dtype=torch.float16)}
    with pytest.raises(adamix.AdamixError, match="does not fit shape"):
        kinds.decode("topk-sparse", (4, 4), {}, bad)
