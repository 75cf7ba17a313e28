"""io.manifest: the schema is what the writer writes, and the reader requires it."""

from __future__ import annotations

import json
import shutil

import pytest

import adamix
from adamix.io.artifact import MANIFEST
from adamix.io.manifest import Entry, Manifest


@pytest.fixture(scope="module")
def artifact(llama_pair, tmp_path_factory):
    out = tmp_path_factory.mktemp("manifest") / "d"
    adamix.compress(*llama_pair, out, calib=None, ratio="1/8", progress=False)
    return out


def fields(typed) -> set[str]:
    return set(typed.__required_keys__ | typed.__optional_keys__)


def test_the_writer_writes_exactly_the_schema(artifact):
    m = json.loads((artifact / MANIFEST).read_text())
    assert set(m) == fields(Manifest)
    assert m["tensors"] and all(set(e) == fields(Entry) for e in m["tensors"].values())


@pytest.mark.parametrize("field", sorted(Manifest.__required_keys__ - {"format", "format_version"}))
def test_a_missing_required_field_is_refused_in_one_line(artifact, tmp_path, field):
    bad = tmp_path / "d"
    shutil.copytree(artifact, bad)
    m = json.loads((bad / MANIFEST).read_text())
    del m[field]
    (bad / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(adamix.AdamixError) as e:
        adamix.load(bad)
    assert str(e.value) == f"{bad / MANIFEST}: the manifest has no {field!r} field"


@pytest.mark.parametrize("field", sorted(Entry.__required_keys__))
def test_an_entry_without_a_required_field_is_refused(artifact, tmp_path, field):
    bad = tmp_path / "d"
    shutil.copytree(artifact, bad)
    m = json.loads((bad / MANIFEST).read_text())
    name = sorted(m["tensors"])[0]
    del m["tensors"][name][field]
    (bad / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(adamix.AdamixError, match=f"manifest entry '{name}' has no '{field}' field$"):
        adamix.load(bad)


def test_optional_fields_take_their_defaults(artifact, tmp_path):
    """`dropped` and an entry's dtype, transposed, meta and stats may be absent (defaults)."""
    ok = tmp_path / "d"
    shutil.copytree(artifact, ok)
    m = json.loads((ok / MANIFEST).read_text())
    del m["dropped"]
    raw = next(n for n, e in m["tensors"].items() if e["kind"] == "raw")
    for key in Entry.__optional_keys__:
        del m["tensors"][raw][key]
    (ok / MANIFEST).write_text(json.dumps(m))
    art = adamix.load(ok)
    assert art.delta(raw).shape == tuple(m["tensors"][raw]["shape"])
