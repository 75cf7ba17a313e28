"""encode_block with the ILPs overlapped (worker threads decide matrices while the next are prepared):
the same encodings, byte for byte, as one matrix after the other, in the same order."""

from __future__ import annotations

import threading

import torch

from adamix.compression.encode import encode_block
from adamix.methods import Settings, get


def block_of_deltas(seed=0):
    """{name: (H, transposed)} and the deltas of a toy block: three matrices with a Gram, one norm vector."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"q": (48, 32), "up": (80, 32), "down": (32, 80)}
    deltas, names = {}, {}
    for name, (m, n) in shapes.items():
        deltas[name] = (torch.randn(m, 6, generator=g) @ torch.randn(6, n, generator=g) + 0.1 * torch.randn(m, n, generator=g)) * 0.01
        X = torch.randn(n, 4 * n, generator=g) * torch.linspace(0.2, 2.0, n)[:, None]
        names[name] = (X @ X.T, False)
    deltas["norm"] = 0.01 * torch.randn(32, generator=g)
    names["norm"] = (None, False)
    return names, deltas


def test_overlapped_ilp_gives_the_same_bytes(monkeypatch):
    settings = Settings(alpha=1 / 8, group_size=16)
    method = get("adamix")
    threads = []
    decide = method.decide
    monkeypatch.setattr(method, "decide", lambda p, s: threads.append(threading.current_thread().name) or decide(p, s))
    runs = {}
    for workers in (0, 1, 2):
        names, deltas = block_of_deltas()
        runs[workers] = encode_block(names, deltas.__getitem__, settings, 0.0, workers)
        assert names == {}  # every entry consumed
    for workers in (1, 2):
        assert list(runs[workers]) == list(runs[0]) == ["q", "up", "down", "norm"]
        for name, (enc, transposed) in runs[0].items():
            other, t2 = runs[workers][name]
            assert transposed == t2 and enc.kind == other.kind and enc.meta == other.meta
            assert enc.tensors.keys() == other.tensors.keys()
            assert all(torch.equal(enc.tensors[k], other.tensors[k]) for k in enc.tensors)
            assert enc.stats == other.stats
    # sequential runs decide in compress (no worker); overlapped ones in worker threads, once per matrix
    assert len(threads) == 6 and all(t.startswith("adamix-ilp") for t in threads)


def test_block_budget_scope_is_never_staged(monkeypatch):
    method = get("adamix")
    monkeypatch.setattr(method, "prepare", lambda *a, **k: (_ for _ in ()).throw(AssertionError("staged")))
    names, deltas = block_of_deltas(1)
    out = encode_block(names, deltas.__getitem__, Settings(alpha=1 / 8, group_size=16, budget_scope="block"), 0.0, 2)
    assert set(out) == {"q", "up", "down", "norm"}
