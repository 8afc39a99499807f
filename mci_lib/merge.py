"""The differentiable merging layer (DESIGN section 6, "Merging layer").

For one cross-attention key or value weight ``W`` (d_out x d), regularization token embeddings
``K`` (R x d), and per-concept target token embeddings ``C_n`` with adapted weights ``W_n``:
stack ``C = [C_n]`` and ``V^T = [W_n C_n^T]``.

Hard form (Custom Diffusion's closed form, used by MIMA)::

    min ||(W' - W) K^T||_F^2 + delta ||W' - W||_F^2   s.t.  W' C^T = V^T
    W' = W + (V^T - W C^T) (C M^-1 C^T)^-1 C M^-1,     M = K^T K + delta I

Soft form (the constraint as a penalty of weight ``lam_m``)::

    W' = (W M + lam_m V^T C) (M + lam_m C^T C)^-1

Both are written with Cholesky solves, never an explicit inverse, and are differentiable in
``W``, every ``W_n`` and the embeddings. ``M``'s factor depends only on ``K`` and ``delta``, so
it is computed once per run (:class:`MergeFactor`), not once per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class MergeFactor:
    """``M = K^T K + delta I`` and its Cholesky factor, for one regularization set."""

    M: torch.Tensor  # (d, d)
    L: torch.Tensor  # lower Cholesky factor of M

    @classmethod
    def from_embeddings(cls, K: torch.Tensor, delta: float) -> "MergeFactor":
        """``K``: (R, d) regularization token embeddings, encoded once per run."""
        if delta <= 0:
            raise ValueError(f"merge delta must be > 0 (got {delta}); it keeps M positive definite")
        K = K.reshape(-1, K.shape[-1])
        M = K.T @ K + delta * torch.eye(K.shape[-1], dtype=K.dtype, device=K.device)
        return cls(M=M, L=torch.linalg.cholesky(M))

    def solve(self, B: torch.Tensor) -> torch.Tensor:
        """``M^-1 B`` for B of shape (d, k)."""
        return torch.cholesky_solve(B, self.L)

    def to(self, dtype: torch.dtype) -> "MergeFactor":
        return MergeFactor(self.M.to(dtype), self.L.to(dtype))


def independent_rows(C: torch.Tensor, rtol: float = 1e-4) -> torch.Tensor:
    """Indices of a maximal set of linearly independent rows of ``C`` (greedy Gram-Schmidt in the
    order given). Near-duplicate rows, equal up to ``rtol`` of their norm, are dropped: without this
    ``C M^-1 C^T`` is singular whenever two target tokens share an embedding, or there are more
    target rows than dimensions. The choice is discrete; gradients flow through the kept rows."""
    with torch.no_grad():
        X = C.detach().to(torch.float64)
        basis: list[torch.Tensor] = []
        keep = []
        for i, row in enumerate(X):
            norm = row.norm()
            if norm == 0:
                continue
            r = row.clone()
            for b in basis:  # two passes of Gram-Schmidt for numerical stability
                r = r - (r @ b) * b
            for b in basis:
                r = r - (r @ b) * b
            if r.norm() > rtol * norm:
                basis.append(r / r.norm())
                keep.append(i)
            if len(basis) == X.shape[1]:
                break
    return torch.tensor(keep, dtype=torch.long, device=C.device)


def stack_targets(W_adapted: Sequence[torch.Tensor], C_targets: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``C = [C_n]`` (T x d) and ``V^T = [W_n C_n^T]`` (d_out x T)."""
    if len(W_adapted) != len(C_targets) or not W_adapted:
        raise ValueError(f"merge: {len(W_adapted)} adapted weights for {len(C_targets)} target sets")
    C = torch.cat([c.reshape(-1, c.shape[-1]) for c in C_targets])
    VT = torch.cat([w @ c.reshape(-1, c.shape[-1]).T for w, c in zip(W_adapted, C_targets)], dim=1)
    return C, VT


@dataclass(frozen=True)
class HardMergePlan:
    """What the hard merge needs of the target rows alone: the independent rows kept, ``C``,
    ``A = M^-1 C^T`` and the Cholesky factor of ``S = C M^-1 C^T``. Immunization's targets are
    fixed, so the plan is built once per run and each merge is then two small products and a solve."""

    keep: torch.Tensor
    C: torch.Tensor  # (T, d), kept rows
    A: torch.Tensor  # (d, T)
    S_factor: torch.Tensor  # (T, T)

    @classmethod
    def build(cls, C_targets: Sequence[torch.Tensor], factor: MergeFactor, rtol: float = 1e-4) -> "HardMergePlan":
        C = torch.cat([c.reshape(-1, c.shape[-1]) for c in C_targets])
        keep = independent_rows(C, rtol)
        C = C[keep]
        A = factor.solve(C.T)  # M^-1 C^T
        S = C @ A  # symmetric positive definite
        return cls(keep, C, A, torch.linalg.cholesky(0.5 * (S + S.T)))


def hard_merge(
    W: torch.Tensor, W_adapted: Sequence[torch.Tensor], C_targets: Sequence[torch.Tensor], factor: MergeFactor, rtol: float = 1e-4, plan: HardMergePlan | None = None
) -> torch.Tensor:
    """The hard-constraint merge ``W' = W + (V^T - W C^T)(C M^-1 C^T)^-1 C M^-1``. Without a
    ``plan`` it is built here, so the result is differentiable in the embeddings too; with one
    (fixed targets) only ``W`` and the ``W_n`` carry gradients."""
    plan = plan or HardMergePlan.build(C_targets, factor, rtol)
    _, VT = stack_targets(W_adapted, C_targets)
    R = VT[:, plan.keep] - W @ plan.C.T  # (d_out, T)
    X = torch.cholesky_solve(R.T, plan.S_factor).T  # R S^-1
    return W + X @ plan.A.T


def soft_merge(W: torch.Tensor, W_adapted: Sequence[torch.Tensor], C_targets: Sequence[torch.Tensor], factor: MergeFactor, lam_m: float) -> torch.Tensor:
    """The soft merge ``W' = (W M + lam_m V^T C)(M + lam_m C^T C)^-1``."""
    C, VT = stack_targets(W_adapted, C_targets)
    A = factor.M + lam_m * C.T @ C  # symmetric positive definite
    B = W @ factor.M + lam_m * VT @ C  # (d_out, d)
    return torch.cholesky_solve(B.T, torch.linalg.cholesky(A)).T


def merge_residual(W_merged: torch.Tensor, W_adapted: Sequence[torch.Tensor], C_targets: Sequence[torch.Tensor]) -> float:
    """Relative residual ``||W' C^T - V^T|| / ||V^T||``: how far the merge is from every concept's
    adapted outputs on its own target tokens (0 for the hard form, up to dropped duplicate rows)."""
    C, VT = stack_targets(W_adapted, C_targets)
    with torch.no_grad():
        return float((W_merged @ C.T - VT).norm() / VT.norm().clamp_min(1e-12))
