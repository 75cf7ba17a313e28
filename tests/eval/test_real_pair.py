"""End to end on the real third-party pair all-MiniLM-L6-v2 -> sre-embedding-model at 1/16.

Needs the two weight packages (installed by .ci/run) and gensim's texts; takes a few minutes.
"""

from __future__ import annotations

import importlib.util

import pytest

import adamix
from adamix.eval.demo import PAIR, package_folder
from adamix.eval.heldout import embedding_cosine, heldout_corpora, mean_pooled, relative_output_error

pytestmark = pytest.mark.slow

if any(importlib.util.find_spec(p) is None for p, _ in PAIR):
    pytest.skip("weight packages not installed (see README)", allow_module_level=True)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    base, ft = (package_folder(*p) for p in PAIR)
    work = tmp_path_factory.mktemp("minilm")
    manifest = adamix.compress(base, ft, work / "delta", ratio="1/16", progress=False)
    adamix.merge(base, work / "delta", work / "merged", progress=False)
    return base, ft, work, manifest


def test_size_on_disk_within_one_sixteenth(result):
    _, _, work, manifest = result
    s = manifest["sizes"]
    on_disk = (work / "delta" / "delta.safetensors").stat().st_size + (work / "delta" / "manifest.json").stat().st_size
    assert on_disk == s["total_bytes"]
    assert on_disk <= s["fp16_bytes_method"] / 16 + s["raw_bytes"]
    assert s["alpha_achieved"] <= 1 / 16
    assert s["alpha_achieved"] > 0.9 / 16  # the budget is used, not wasted


@pytest.fixture(scope="module")
def quality(result):
    base, ft, work, _ = result
    corpora = heldout_corpora()
    texts = [t for c in corpora.values() for t in c]
    err = relative_output_error(base, ft, str(work / "delta"), texts)["relative_error"]
    cos = {}
    for name, tx in {"all": texts, **corpora}.items():
        e_ft = mean_pooled(ft, tx)
        cos[name] = (embedding_cosine(mean_pooled(str(work / "merged"), tx), e_ft),
                     embedding_cosine(mean_pooled(base, tx), e_ft))
    return err, cos


def test_heldout_output_error(quality):
    err, _ = quality
    assert err <= 0.20


def test_embedding_agreement(quality):
    """The issue's figure for the base alone ("about 0.64") is the mean over the two held-out corpora
    (Lee 0.700, polarity 0.569); the merged model must reach 0.9995 by the same measure."""
    _, cos = quality
    merged = (cos["lee"][0] + cos["polarity"][0]) / 2
    base = (cos["lee"][1] + cos["polarity"][1]) / 2
    assert 0.6 < base < 0.7  # the pair really differs, and this is the measure
    assert merged >= 0.9995
    assert cos["all"][0] >= 0.999  # pooled over all 250 texts: regression guard


def test_embedding_agreement_pooled(quality):
    """Pooled over all 250 texts (dominated by the 200 short polarity sentences). This was an xfail
    while the polarity sentences kept their label prefix; without it the pooled cosine clears the
    bar, so the test now holds it (an xfail with strict=False could never fail)."""
    _, cos = quality
    assert cos["all"][0] >= 0.9995
