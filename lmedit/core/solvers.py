"""Closed-form solutions of the preservation-memorization objective (pure tensor functions).

Example: ``dW = emmet(R, K, C, lam=1.0, ridge=0.1)  # (d_out, d_in)``

Symbols (as in the paper): W (d_out x d_in) the edited weight; K (d_in x B) keys of the edited
facts; R (d_out x B) residuals V - W K; C (d_in x d_in) the uncentred second moment of the keys of
preserved knowledge (a mean over corpus tokens); lambda (``lam``) its weight.

    ROME  (one key, equality):      dW = r (C^-1 k)^T / (k^T C^-1 k)
    MEMIT (least squares):          dW = R K^T (lam C + mu I + P_e + K K^T)^-1
    EMMET (batched equality):       dW = R (K^T C'^-1 K + ridge I)^-1 K^T C'^-1,  C' = lam C + mu I + P_e
    AlphaEdit (null space):         dW = R K^T U (U^T (P_e + K K^T) U + alpha I)^-1 U^T

P_e = sum K_p K_p^T over the keys of earlier edits (lifelong editing: later batches preserve them;
for MEMIT with fixed keys this is exactly recursive least squares), mu a Frobenius-norm ridge
(ENCORE), and U (d_in x r) an orthonormal basis of the null space of the preserved keys
(AlphaEdit's projector is U U^T): the update leaves every key in the span of C's large
eigenvectors unchanged.

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


def _preserved(C: torch.Tensor, lam: float, mu: float, earlier: torch.Tensor | None) -> torch.Tensor:
    """lam C + mu I + P_e in float64, (d_in, d_in)."""
    A = lam * C.to(DTYPE)
    if mu:
        A = A + mu * torch.eye(C.shape[0], dtype=DTYPE, device=C.device)
    if earlier is not None:
        if earlier.shape != C.shape:
            raise ValueError(f"earlier-keys matrix must be {tuple(C.shape)}, got {tuple(earlier.shape)}")
        A = A + earlier.to(DTYPE)
    return A


def memit(R: torch.Tensor, K: torch.Tensor, C: torch.Tensor, lam: float, mu: float = 0.0,
          earlier: torch.Tensor | None = None) -> torch.Tensor:
    """dW = R K^T (lam C + mu I + P_e + K K^T)^-1 (least-squares memorization; ``earlier`` = P_e)."""
    _check(R, K, C)
    R, K = R.to(DTYPE), K.to(DTYPE)
    A = _preserved(C, lam, mu, earlier) + K @ K.T  # (d_in, d_in), symmetric
    L = _chol(A, "lambda * C + mu I + P_e + K K^T")
    X = torch.cholesky_solve(K, L)  # A^-1 K, (d_in, B)
    return _finite(R @ X.T, "MEMIT")


def emmet(R: torch.Tensor, K: torch.Tensor, C: torch.Tensor, lam: float = 1.0, ridge: float = 0.0,
          mu: float = 0.0, earlier: torch.Tensor | None = None) -> torch.Tensor:
    """dW = R (K^T C'^-1 K + ridge I)^-1 K^T C'^-1 with C' = lam C + mu I + P_e (equality memorization).

    With ridge 0 the edited weight meets (W + dW) K = W K + R exactly; with one key it is ROME.
    """
    _check(R, K, C)
    R, K = R.to(DTYPE), K.to(DTYPE)
    Cp = _preserved(C, lam, mu, earlier)
    Lc = _chol(Cp, "lambda * C + mu I + P_e")
    CinvK = torch.cholesky_solve(K, Lc)  # C'^-1 K, (d_in, B)
    D = K.T @ CinvK  # (B, B)
    D = 0.5 * (D + D.T) + ridge * torch.eye(D.shape[0], dtype=DTYPE, device=D.device)
    Ld = _chol(D, "K^T C'^-1 K + ridge I")
    Y = torch.cholesky_solve(R.T, Ld)  # D^-1 R^T, (B, d_out)
    return _finite(Y.T @ CinvK.T, "EMMET")


def null_space_basis(C: torch.Tensor, energy: float) -> torch.Tensor:
    """U (d_in, r): eigenvectors of C with the smallest eigenvalues that together hold at most
    ``energy`` of trace(C), i.e. of E||k||^2 (a scale-free rule: AlphaEdit's absolute eigenvalue
    threshold 2e-2 depends on the model's activation scale).

    Keys drawn like the statistics' keep at most that fraction of their energy in span(U), so an
    update confined to it changes their outputs at most by that much.
    """
    if not 0 < energy < 1:
        raise ValueError(f"null-space energy must be in (0, 1), got {energy}")
    evals, evecs = torch.linalg.eigh(C.to(DTYPE))  # ascending
    share = torch.cumsum(evals.clamp_min(0), 0) / evals.clamp_min(0).sum()
    r = int((share <= energy).sum())
    if r == 0:
        raise SolveError(f"no eigenvector of C holds less than {energy} of its trace; raise the null-space energy")
    return evecs[:, :r].contiguous()


def alphaedit(R: torch.Tensor, K: torch.Tensor, U: torch.Tensor, alpha: float,
              earlier: torch.Tensor | None = None) -> torch.Tensor:
    """dW = R K^T U (U^T (P_e + K K^T) U + alpha I)^-1 U^T (AlphaEdit's update, projector P = U U^T).

    AlphaEdit writes the solve as (P (P_e + K K^T) + alpha I)^-1 P K R^T; its solution lies in the
    range of P, so with P = U U^T it is the r x r symmetric positive definite system above.
    """
    if U.dim() != 2 or U.shape[0] != K.shape[0]:
        raise ValueError(f"U must be (d_in, r) with d_in = {K.shape[0]}, got {tuple(U.shape)}")
    R, K, U = R.to(DTYPE), K.to(DTYPE), U.to(DTYPE)
    Kt = U.T @ K  # (r, B) keys in the null-space coordinates
    A = Kt @ Kt.T + alpha * torch.eye(U.shape[1], dtype=DTYPE, device=U.device)  # (r, r)
    if earlier is not None:
        A = A + U.T @ earlier.to(DTYPE) @ U
    L = _chol(0.5 * (A + A.T), "U^T (P_e + K K^T) U + alpha I")
    Y = torch.cholesky_solve(Kt @ R.T, L)  # (r, d_out)
    return _finite((U @ Y).T, "AlphaEdit")


# --- several layers solved as one problem (the `joint` distribution) ---------------------------------
#
# Every closed form above is dW = R F(G)^-1 (M^-1 K)^T with G = K^T M^-1 K (B x B) and M the layer's
# preservation metric: least squares (MEMIT, AlphaEdit) F(G) = I + G, equality (EMMET, ROME)
# F(G) = G + ridge I (push-through identity: R K^T (M + K K^T)^-1 = R (I + G)^-1 K^T M^-1). Over
# several layers whose outputs add to one residual stream, minimising sum_l ||dW_l||_{M_l}^2 with
# sum_l dW_l K_l = R (equality) or + ||sum_l dW_l K_l - R||^2 (least squares) gives the same form
# with G = sum_l G_l and dW_l = Lambda (M_l^-1 K_l)^T (docs/distributions.md derives it).

def metric_solve(K: torch.Tensor, C: torch.Tensor, lam: float, mu: float = 0.0,
                 earlier: torch.Tensor | None = None) -> torch.Tensor:
    """Y = M^-1 K with M = lam C + mu I + P_e, (d_in, B) float64."""
    M = _preserved(C, lam, mu, earlier)
    return torch.cholesky_solve(K.to(DTYPE), _chol(M, "lambda * C + mu I + P_e"))


def null_metric_solve(K: torch.Tensor, U: torch.Tensor, alpha: float,
                      earlier: torch.Tensor | None = None) -> torch.Tensor:
    """AlphaEdit's Y = U M~^-1 U^T K with M~ = U^T P_e U + alpha I (its metric in null-space coordinates)."""
    U = U.to(DTYPE)
    M = alpha * torch.eye(U.shape[1], dtype=DTYPE, device=U.device)
    if earlier is not None:
        M = M + U.T @ earlier.to(DTYPE) @ U
    return U @ torch.cholesky_solve(U.T @ K.to(DTYPE), _chol(0.5 * (M + M.T), "U^T P_e U + alpha I"))


def joint(R: torch.Tensor, Ks: list[torch.Tensor], Ys: list[torch.Tensor], kind: str,
          ridge: float = 0.0) -> list[torch.Tensor]:
    """Per layer dW_l = Lambda Y_l^T with Lambda = R F(sum_l K_l^T Y_l)^-1 (see above); ``Y_l = M_l^-1 K_l``.

    ``kind`` is "least_squares" (F(G) = I + G) or "equality" (F(G) = G + ridge I)."""
    if kind not in ("least_squares", "equality"):
        raise ValueError(f"kind must be 'least_squares' or 'equality', got {kind!r}")
    R = R.to(DTYPE)
    G = sum(K.to(DTYPE).T @ Y for K, Y in zip(Ks, Ys, strict=True))  # (B, B)
    eye = torch.eye(G.shape[0], dtype=DTYPE, device=G.device)
    F = 0.5 * (G + G.T) + (eye if kind == "least_squares" else ridge * eye)
    Lam_T = torch.cholesky_solve(R.T, _chol(F, "the joint system sum_l K_l^T M_l^-1 K_l" + (" + I" if kind == "least_squares" else " + ridge I")))
    return [_finite(Lam_T.T @ Y.T, "the joint solve") for Y in Ys]


def rome(r: torch.Tensor, k: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """dW = r (C^-1 k)^T / (k^T C^-1 k) for one key k (d_in,) and residual r (d_out,)."""
    if k.dim() != 1 or r.dim() != 1:
        raise ValueError(f"ROME takes one key and one residual, got k {tuple(k.shape)}, r {tuple(r.shape)}")
    return emmet(r[:, None], k[:, None], C, lam=1.0, ridge=0.0)
