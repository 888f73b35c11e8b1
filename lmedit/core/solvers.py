"""Closed-form solutions of the preservation-memorization objective (pure tensor functions).

Example: ``dW = emmet(R, K, C, lam=1.0, ridge=0.1)  # (d_out, d_in)``

Symbols (as in the paper): W (d_out x d_in) the edited weight; K (d_in x B) keys of the edited
facts; R (d_out x B) residuals V - W K; C (d_in x d_in) the uncentred second moment of the keys of
preserved knowledge (a mean over corpus tokens); lambda (``lam``) its weight.

    ROME  (one key, equality):      dW = r (C^-1 k)^T / (k^T C^-1 k)
    MEMIT (least squares):          dW = R K^T (lam C + K K^T)^-1
    EMMET (batched equality):       dW = R (K^T C'^-1 K + ridge I)^-1 K^T C'^-1,  C' = lam C + mu I

All solves run in float64 (the systems are ill-conditioned: C's eigenvalues span many orders of
magnitude) through Cholesky factorisations, never an explicit inverse. A system that is not
positive definite, or a result that is not finite, raises :class:`SolveError`.
"""

from __future__ import annotations

import torch

from lmedit.errors import SolveError

DTYPE = torch.float64


def _chol(A: torch.Tensor, what: str) -> torch.Tensor:
    if not torch.isfinite(A).all():
        raise SolveError(f"{what} contains NaN or inf; check the statistics and the keys")
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:
        raise SolveError(
            f"{what} is not positive definite (Cholesky failed at column {int(info)}); it is singular or "
            "ill-conditioned: increase the preservation weight lambda (mom2_update_weight), the ridge, "
            "or mu (update_norm_lambda), or collect statistics over more tokens"
        )
    return L


def _finite(dW: torch.Tensor, what: str) -> torch.Tensor:
    if not torch.isfinite(dW).all():
        raise SolveError(f"{what} produced a non-finite update; the system is too ill-conditioned")
    return dW


def _check(R: torch.Tensor, K: torch.Tensor, C: torch.Tensor) -> None:
    if K.dim() != 2 or R.dim() != 2 or K.shape[1] != R.shape[1]:
        raise ValueError(f"expected K (d_in, B) and R (d_out, B), got K {tuple(K.shape)} and R {tuple(R.shape)}")
    if C.shape != (K.shape[0], K.shape[0]):
        raise ValueError(f"C must be ({K.shape[0]}, {K.shape[0]}) to match K, got {tuple(C.shape)}")


def memit(R: torch.Tensor, K: torch.Tensor, C: torch.Tensor, lam: float) -> torch.Tensor:
    """dW = R K^T (lam C + K K^T)^-1 (least-squares memorization)."""
    _check(R, K, C)
    R, K, C = R.to(DTYPE), K.to(DTYPE), C.to(DTYPE)
    A = lam * C + K @ K.T  # (d_in, d_in), symmetric
    L = _chol(A, "lambda * C + K K^T")
    X = torch.cholesky_solve(K, L)  # A^-1 K, (d_in, B)
    return _finite(R @ X.T, "MEMIT")


def emmet(R: torch.Tensor, K: torch.Tensor, C: torch.Tensor, lam: float = 1.0, ridge: float = 0.0,
          mu: float = 0.0) -> torch.Tensor:
    """dW = R (K^T C'^-1 K + ridge I)^-1 K^T C'^-1 with C' = lam C + mu I (equality memorization).

    With ridge 0 the edited weight meets (W + dW) K = W K + R exactly; with one key it is ROME.
    """
    _check(R, K, C)
    R, K, C = R.to(DTYPE), K.to(DTYPE), C.to(DTYPE)
    Cp = lam * C
    if mu:
        Cp = Cp + mu * torch.eye(C.shape[0], dtype=DTYPE, device=C.device)
    Lc = _chol(Cp, "lambda * C (+ mu I)")
    CinvK = torch.cholesky_solve(K, Lc)  # C'^-1 K, (d_in, B)
    D = K.T @ CinvK  # (B, B)
    D = 0.5 * (D + D.T) + ridge * torch.eye(D.shape[0], dtype=DTYPE, device=D.device)
    Ld = _chol(D, "K^T C'^-1 K + ridge I")
    Y = torch.cholesky_solve(R.T, Ld)  # D^-1 R^T, (B, d_out)
    return _finite(Y.T @ CinvK.T, "EMMET")


def rome(r: torch.Tensor, k: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """dW = r (C^-1 k)^T / (k^T C^-1 k) for one key k (d_in,) and residual r (d_out,)."""
    if k.dim() != 1 or r.dim() != 1:
        raise ValueError(f"ROME takes one key and one residual, got k {tuple(k.shape)}, r {tuple(r.shape)}")
    return emmet(r[:, None], k[:, None], C, lam=1.0, ridge=0.0)
