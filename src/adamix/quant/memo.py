"""A one-entry memo of what is computed from a Gram: the linears that read the same input (a block's
q, k and v projections; gate and up) share one Gram tensor, one after another, and its factors
(GPTQ's factor of H^-1, the whitening factor) are computed once for all of them.

The entry is keyed by the Gram's identity, its in-place version counter and the parameters, so a
Gram written in place or another Gram computes afresh; it lives no longer than its Gram (a weak
reference drops it when the Gram is freed), so it holds no memory that the Gram does not already
pin. The result is the one the computation returns, bit for bit."""

from __future__ import annotations

import threading
import weakref
from typing import Any, Callable

import torch


class LastGram:
    """memo.get(H, params, compute): compute() for Gram H and hashable params, or the value kept from
    the last call with the same H (unchanged) and params."""

    def __init__(self):
        self._lock = threading.Lock()
        self._ref: weakref.ref | None = None
        self._key: tuple | None = None
        self._value: Any = None

    def get(self, H: torch.Tensor, params: tuple, compute: Callable[[], Any]) -> Any:
        key = (H._version, params)
        with self._lock:
            if self._ref is not None and self._ref() is H and self._key == key:
                return self._value
        value = compute()
        with self._lock:
            self._ref, self._key, self._value = weakref.ref(H, self._drop), key, value
        return value

    def _drop(self, ref: weakref.ref) -> None:
        with self._lock:
            if self._ref is ref:
                self._ref = self._key = self._value = None
