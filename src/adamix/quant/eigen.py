"""The eigendecomposition of a symmetric matrix with its vectors back-transformed on demand.

A symmetric eigensolver (LAPACK's syevd, torch.linalg.eigh on the CPU) works in three steps:
reduce M (n x n) to a tridiagonal T = Q^T M Q (sytrd, 4/3 n^3 flops), solve T = Z diag(lam) Z^T
(stedc, divide and conquer), and back-transform every vector, V = Q Z (ormtr, 2 n^3 flops). A
whitened spectrum needs every eigenvalue (the error table's bounds) but the vectors of its leading
triplets only (those an optimal choice may keep), so the last step is done here for the columns asked
for: 2 n^2 k flops for k of the n vectors, the same vectors as the whole solve's.

On the CPU the steps are LAPACK's through scipy (sytrd on M's own memory, stevd on T) and the
back-transform torch.ormqr (sytrd's reflectors with UPLO "L" are a QR factorisation's of
M[1:, :n-1], so Q = diag(1, Q'), Q' from ormqr: what ormtr does). Elsewhere (a GPU) torch.linalg.eigh
computes everything at once: its vectors cost little there.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg.lapack as lapack
import torch

_LAPACK = {torch.float32: "s", torch.float64: "d"}


class PartialEigen:
    """M = V diag(lam) V^T for a symmetric M (n x n, read on its upper triangle only, and overwritten:
    it holds the reflectors of Q afterwards). values: lam (n,) by decreasing value, in M's dtype and
    device. vectors(a, b): the columns a..b-1 of V (n, b - a) in that order."""

    def __init__(self, M: torch.Tensor):
        self.n = M.shape[0]
        if M.device.type != "cpu" or M.dtype not in _LAPACK or self.n < 2:
            lam, V = torch.linalg.eigh(M, UPLO="U")
            self.values, self._V, self._Q = lam.flip(0), V.flip(1), None
            return
        p = _LAPACK[M.dtype]
        a = M.numpy().T  # Fortran order: M^T, whose lower triangle is M's upper one; sytrd works in place
        sytrd, stevd = getattr(lapack, p + "sytrd"), getattr(lapack, p + "stevd")
        lwork = int(getattr(lapack, p + "sytrd_lwork")(self.n, lower=1)[0])
        c, d, e, tau, info = sytrd(a, lower=1, lwork=lwork, overwrite_a=1)
        if info != 0:
            raise RuntimeError(f"{p}sytrd failed (info {info})")
        lam, Z, info = stevd(d, e, compute_v=1, overwrite_d=1, overwrite_e=1)
        if info != 0:
            raise RuntimeError(f"{p}stevd failed (info {info}): the tridiagonal eigensolver did not converge")
        self.values = torch.from_numpy(np.ascontiguousarray(lam[::-1]))
        self._Z = torch.from_numpy(Z)  # T's eigenvectors, ascending (Fortran order: columns contiguous)
        self._Q = torch.from_numpy(c)[1:, :self.n - 1], torch.from_numpy(tau)  # the reflectors of Q' (in M's memory)

    def vectors(self, a: int, b: int) -> torch.Tensor:
        """Eigenvectors a..b-1 (by decreasing eigenvalue) as the columns of an (n, b - a) tensor."""
        if self._Q is None:
            return self._V[:, a:b]
        n = self.n
        Z = self._Z[:, n - b:n - a].flip(1)  # by decreasing eigenvalue (a copy)
        if b > a:
            reflectors, tau = self._Q
            Z[1:] = torch.ormqr(reflectors, tau, Z[1:], left=True, transpose=False)
        return Z
