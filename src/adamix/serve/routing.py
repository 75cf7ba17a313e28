"""Which rows of a batch belong to which tenant."""

from __future__ import annotations

import torch

from ..errors import AdamixError

BASE = "base"  # the tenant name of rows answered by the plain base model


class Router:
    """The per-row tenant names of the batch being run, grouped once per batch size.

    groups(b) -> [(tenant, rows)], rows a slice when the tenant's rows are adjacent, else an int64
    index. A module seeing b = r * B rows (generate with num_return_sequences / beams repeats
    every row r times in place) gets the names repeated r times each. "base" rows are left out.
    """

    def __init__(self):
        self.names: list[str] | None = None
        self.key: tuple | None = None  # the names as a tuple: modules key what they prepare per batch on it
        self._groups: dict[tuple[int, str], list] = {}

    def set(self, names: list[str] | None) -> None:
        self.names, self._groups = names, {}
        self.key = tuple(names) if names else None

    def groups(self, b: int, device: torch.device) -> list[tuple[str, slice | torch.Tensor]]:
        names = self.names
        if not names:
            return []
        key = (b, str(device))
        if key in self._groups:
            return self._groups[key]
        B = len(names)
        if b % B:
            raise AdamixError(f"a module got {b} rows but the batch has {B} (one tenant name per row is needed)")
        rep = b // B
        rows_of: dict[str, list[int]] = {}
        for i, n in enumerate(names):
            if n != BASE:
                rows_of.setdefault(n, []).extend(range(i * rep, (i + 1) * rep))
        out = []
        for n, rows in rows_of.items():
            if rows[-1] - rows[0] + 1 == len(rows):
                out.append((n, slice(rows[0], rows[-1] + 1)))
            else:
                out.append((n, torch.tensor(rows, dtype=torch.long, device=device)))
        self._groups[key] = out
        return out
