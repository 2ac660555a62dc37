"""Orthonormal bases for PowerSGD's P: Householder QR (the paper's choice), LAPACK's QR, and Gram-Schmidt.

DALL-E (arXiv 2102.12092, E.2 step 5) orthogonalizes P with Householder reflections "rather than Gram-Schmidt, as we
found the latter to be numerically unstable", after adding eps * I (the r x r identity in the top block, zeros below)
so that a rank-deficient P (e.g. an all-zero error buffer at the start) still yields r orthonormal columns.

All three take P ``[n, r]`` with n >= r and return ``[n, r]`` with orthonormal columns spanning the same space (up to
signs). ``householder`` is ours: r reflections applied to the whole matrix with vectorized torch ops (the work is
2 n r^2 - 2 r^3 / 3 multiply-adds for the factorization plus as much to form the basis), ``qr`` calls
``torch.linalg.qr`` (LAPACK geqrf + orgqr / cuSOLVER, also Householder), ``gram_schmidt`` is modified Gram-Schmidt,
kept for the benchmark's comparison (torch's ``powerSGD_hook`` uses it).
"""
from __future__ import annotations

from typing import Callable

import torch

__all__ = ["householder", "qr", "gram_schmidt", "ORTHOGONALIZERS", "add_eps_identity", "get_orthogonalizer"]


def add_eps_identity(p: torch.Tensor, eps: "float | torch.Tensor") -> torch.Tensor:
    """``p + eps * I_{n x r}`` (in place on a copy): eps added to the diagonal of the top r x r block. ``eps`` may be
    a 0-dim tensor on p's device (the reducer keeps it there to avoid a host read); either way it is rounded to p's
    dtype before the add."""
    out = p.clone()
    r = min(out.shape)
    out.diagonal()[:r] += eps
    return out


def householder(p: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the columns of ``p`` [n, r] (n >= r) by Householder reflections, in ``p``'s dtype."""
    n, r = p.shape
    if n < r:
        raise ValueError(f"householder needs rows >= columns, got {tuple(p.shape)}")
    a = p.clone()
    vs = []
    for j in range(r):
        x = a[j:, j]
        alpha = torch.linalg.vector_norm(x)
        # v = x + sign(x0) |x| e1 (sign chosen to avoid cancellation); H = I - 2 v v^T / (v^T v)
        sign = torch.where(x[0] >= 0, 1.0, -1.0).to(a.dtype)
        v = x.clone()
        v[0] = v[0] + sign * alpha
        vnorm = torch.linalg.vector_norm(v)
        v = torch.where(vnorm > 0, v / torch.clamp(vnorm, min=torch.finfo(a.dtype).tiny), torch.zeros_like(v))
        a[j:, j:] -= 2.0 * torch.outer(v, v @ a[j:, j:])
        vs.append(v)
    # Form the thin Q = H_0 H_1 ... H_{r-1} [I_r; 0] by applying the reflections in reverse order.
    q = torch.zeros(n, r, dtype=p.dtype, device=p.device)
    q.diagonal()[:] = 1.0
    for j in range(r - 1, -1, -1):
        v = vs[j]
        q[j:, :] -= 2.0 * torch.outer(v, v @ q[j:, :])
    return q


def qr(p: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(p, mode="reduced").Q


def gram_schmidt(p: torch.Tensor) -> torch.Tensor:
    """Modified Gram-Schmidt; a zero column stays zero (the eps * I term prevents that in practice)."""
    q = p.clone()
    n, r = q.shape
    for j in range(r):
        col = q[:, j]
        col /= torch.clamp(torch.linalg.vector_norm(col), min=torch.finfo(q.dtype).tiny)
        if j + 1 < r:
            rest = q[:, j + 1:]
            rest -= torch.outer(col, col @ rest)
    return q


ORTHOGONALIZERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "householder": householder,
    "qr": qr,
    "gram_schmidt": gram_schmidt,
}


def get_orthogonalizer(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        return ORTHOGONALIZERS[name]
    except KeyError:
        raise ValueError(f"unknown orthogonalization {name!r}; choose one of {sorted(ORTHOGONALIZERS)}") from None
