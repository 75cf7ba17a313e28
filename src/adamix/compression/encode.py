"""Encoding the deltas: one transformer block's linears (each alone, or in one shared allocation),
or one tensor, by the registered method; data-free matrices also try the row-sparse form."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from typing import Callable

import torch

from ..memory import release_freed_memory
from ..methods import Encoded, Method, Settings, budget_bits, compress_with, get
from ..methods.raw import encode_raw
from ..methods.rows import compress_rows
from .plan import is_svd_shape


def encode_block(names: dict[str, tuple[torch.Tensor | None, bool]], load: Callable[[str], torch.Tensor],
                 settings: Settings, overhead: float, ilp_workers: int = 0,
                 device: torch.device | str = "cpu") -> dict[str, tuple[Encoded, bool]]:
    """Encode the deltas of one block {name: (H float32 or None, transposed)}; load(name) gives D.
    Each matrix's linear algebra runs on `device` if the method can (Method.device_resident; see
    `placed`), its stored tensors are returned on the CPU.

    One tensor at a time: entries are popped from `names` as they are encoded, so a Gram is freed once
    the last linear sharing it is done, and a D lives only while it is encoded. The Gram stays float32
    (never a float64 copy: 1 GB at width 11008); linalg.gram_rows / matmul64 say how it is used. With
    budget_scope "block" the matrices of a method that can join a shared allocation (Method.joint) share
    one allocation (Method.compress_joint).

    ilp_workers W > 0 (a staged method, Method.staged): each matrix's CPU-only step (the ILP) runs in one
    of W worker threads while the next matrices are prepared, so up to W + 1 matrices' factors are held
    at once. The result is the same, byte for byte, in the same order; the caller gives W only where W
    cores are left beside the linear algebra.
    """
    method = get(settings.method)
    shared = settings.budget_scope == "block" and method.joint
    staged = ilp_workers > 0 and method.staged and not shared
    out = {}
    joint = []
    pending: list[tuple[str, bool, object, Future]] = []  # matrices waiting for their decisions, oldest first

    def settle(keep: int = 0) -> None:
        while len(pending) > keep:
            name, transposed, prepared, decision = pending.pop(0)
            out[name] = (method.complete(prepared, decision.result(), settings), transposed)
            del prepared
            release_freed_memory()

    with ThreadPoolExecutor(ilp_workers, thread_name_prefix="adamix-ilp") if staged else nullcontext() as pool:
        for name in list(names):
            H, transposed = names.pop(name)  # float32: products with it run in float32, sums in float64
            D = load(name)
            svd_shaped = bool(D.any()) and is_svd_shape(tuple(D.shape))
            if svd_shaped:
                D, H = placed(D, H, method, device)
            if shared and svd_shaped:
                Dl = D.T if transposed else D
                joint.append((name, transposed, method.analyse(Dl, H, settings, overhead * D.numel())))
                continue
            if staged and svd_shaped and H is not None:
                prepared = method.prepare(D.T if transposed else D, H, settings, overhead * D.numel())
                settle(keep=ilp_workers - 1)  # the oldest, whose decision ran beside this prepare
                pending.append((name, transposed, prepared, pool.submit(method.decide, prepared, settings)))
                del D, H, prepared
                continue
            settle()
            enc = encode_tensor(D, H, transposed, settings, overhead, device=device)
            if enc is not None:
                out[name] = (enc, transposed)
            del D, H
            release_freed_memory()
        settle()
    if joint:
        for (name, transposed, _), enc in zip(joint, method.compress_joint([a for _, _, a in joint], settings)):
            out[name] = (enc, transposed)
    return out


def encode_tensor(D: torch.Tensor, H: torch.Tensor | None, transposed: bool, settings: Settings,
                  overhead: float = 0.0, device: torch.device | str = "cpu", **shared) -> Encoded | None:
    """The stored form of one delta (None if it is exactly zero); overhead: bits per element reserved.
    The method's linear algebra runs on `device` where it can (`placed`), the row-sparse alternative
    and raw tensors on the CPU; the stored tensors are on the CPU.

    shared: precomputed pieces (factors, analysis: see methods.compress_with; rows: the row-sparse
    alternative of a data-free matrix at this budget)."""
    if not bool(D.any()):
        return None
    if is_svd_shape(tuple(D.shape)):
        Dm, Hm = placed(D, H, get(settings.method), device)
        enc = compress_with(Dm.T if transposed else Dm, Hm, settings, overhead * D.numel(),
                            shared.get("factors"), shared.get("analysis"))
        del Dm, Hm
        if H is None:  # data-free matrices (embeddings, heads): keep the better of the method and row-sparse
            alt = shared.get("rows") or row_sparse(D.cpu(), settings, overhead)
            if alt.stats["error_measured"] < enc.stats["error_measured"]:
                return alt
        return enc
    return encode_raw(D.cpu())


def placed(D: torch.Tensor, H: torch.Tensor | None, method: Method, device: torch.device | str
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """D and H where the method's linear algebra runs: on `device` for a Method.device_resident
    method, else on the CPU (the Grams of a calibration on a GPU come back)."""
    where = torch.device(device) if method.device_resident else torch.device("cpu")
    return D.to(where), None if H is None else H.to(where)


def row_sparse(D: torch.Tensor, settings: Settings, overhead: float) -> Encoded:
    """The row-sparse encoding of a data-free matrix D (m x n) at the method's budget."""
    alpha = get(settings.method).stored_alpha(settings)
    return compress_rows(D, settings.widths, settings.group_size,
                         budget_bits(D.shape[0], D.shape[1], alpha, overhead * D.numel()))
