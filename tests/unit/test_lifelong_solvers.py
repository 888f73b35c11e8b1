"""Closed forms of lifelong editing: earlier edits' keys (recursive least squares), AlphaEdit's
null-space update, and the null-space basis rule. Pure tensor math, float64, no model."""

from __future__ import annotations

import pytest
import torch

from lmedit.core import solvers
from lmedit.errors import SolveError

D_IN, D_OUT = 24, 10


def _spd_with_spectrum(seed: int, decay: float = 1e-4) -> torch.Tensor:
    """C = Q diag(logspace(0, log10 decay)) Q^T: a known spectrum spanning four decades."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(D_IN, D_IN, generator=g, dtype=torch.float64))
    evals = torch.logspace(0, torch.log10(torch.tensor(decay)).item(), D_IN, dtype=torch.float64)
    return Q @ torch.diag(evals) @ Q.T


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("lam,mu", [(1.0, 0.0), (15.0, 0.0), (2.0, 0.5)])
def test_two_batches_with_earlier_keys_equal_one_joint_batch(lam, mu):
    """Recursive least squares: with fixed keys, batch 1 then batch 2 preserving batch 1's keys gives
    the weight that MEMIT (same lambda, mu) reaches with both batches at once."""
    C = _spd_with_spectrum(0)
    W0 = _rand(D_OUT, D_IN, seed=1)
    K1, K2 = _rand(D_IN, 3, seed=2), _rand(D_IN, 4, seed=3)
    V1, V2 = _rand(D_OUT, 3, seed=4), _rand(D_OUT, 4, seed=5)
    W1 = W0 + solvers.memit(V1 - W0 @ K1, K1, C, lam, mu=mu)
    W2 = W1 + solvers.memit(V2 - W1 @ K2, K2, C, lam, mu=mu, earlier=K1 @ K1.T)
    K, V = torch.cat([K1, K2], 1), torch.cat([V1, V2], 1)
    joint = W0 + solvers.memit(V - W0 @ K, K, C, lam, mu=mu)
    assert torch.allclose(W2, joint, atol=1e-10, rtol=1e-8), float((W2 - joint).abs().max())
    without = W1 + solvers.memit(V2 - W1 @ K2, K2, C, lam, mu=mu)  # the check above must be able to fail
    assert float((without - joint).abs().max()) > 1e-3


def test_emmet_with_earlier_keys_keeps_them_better():
    """EMMET preserving batch 1's keys moves their outputs less than plain EMMET does."""
    C = _spd_with_spectrum(1)
    K1, K2 = _rand(D_IN, 3, seed=6), _rand(D_IN, 3, seed=7)
    R2 = _rand(D_OUT, 3, seed=8)
    plain = solvers.emmet(R2, K2, C, lam=1.0)
    kept = solvers.emmet(R2, K2, C, lam=1.0, earlier=100.0 * K1 @ K1.T)
    assert torch.allclose(kept @ K2, R2, atol=1e-8)  # still meets the new equality constraints
    assert (kept @ K1).norm() < 0.2 * (plain @ K1).norm()


def test_alphaedit_matches_the_reference_formula():
    """dW from the r x r SPD system equals AlphaEdit's (P (P_e + K K^T) + alpha I)^-1 P K R^T."""
    C = _spd_with_spectrum(2)
    U = solvers.null_space_basis(C, 0.01)
    K, R, Kp = _rand(D_IN, 5, seed=9), _rand(D_OUT, 5, seed=10), _rand(D_IN, 7, seed=11)
    P = U @ U.T
    ref = torch.linalg.solve(P @ (Kp @ Kp.T + K @ K.T) + 10.0 * torch.eye(D_IN, dtype=torch.float64), P @ K @ R.T).T
    got = solvers.alphaedit(R, K, U, 10.0, earlier=Kp @ Kp.T)
    assert torch.allclose(got, ref, atol=1e-10), float((got - ref).abs().max())


def test_alphaedit_leaves_preserved_keys_unchanged():
    """Keys in the span of C's large eigenvectors (the preserved subspace) are not moved by the update."""
    C = _spd_with_spectrum(3)
    U = solvers.null_space_basis(C, 0.01)
    evals, evecs = torch.linalg.eigh(C)
    preserved = evecs[:, U.shape[1]:]  # the complement of the null space
    dW = solvers.alphaedit(_rand(D_OUT, 4, seed=13), _rand(D_IN, 4, seed=12), U, 10.0)
    k = preserved @ _rand(preserved.shape[1], 50, seed=14)  # 50 keys in the preserved span
    ratio = (dW @ k).norm(dim=0) / k.norm(dim=0)
    assert float(ratio.max()) < 1e-10
    k_null = U @ _rand(U.shape[1], 50, seed=15)  # ... while keys in the null space are moved
    assert float(((dW @ k_null).norm(dim=0) / k_null.norm(dim=0)).max()) > 1e-3


def test_null_space_basis_holds_at_most_its_energy_share():
    C = _spd_with_spectrum(4)
    for energy in (1e-3, 1e-2, 0.1):
        U = solvers.null_space_basis(C, energy)
        assert torch.allclose(U.T @ U, torch.eye(U.shape[1], dtype=torch.float64), atol=1e-10)
        held = float(torch.trace(U.T @ C @ U) / torch.trace(C))
        assert held <= energy
        evals = torch.linalg.eigvalsh(C)  # one more eigenvector would exceed the share
        assert float(evals[: U.shape[1] + 1].sum() / evals.sum()) > energy
    with pytest.raises(SolveError, match="null-space energy"):
        solvers.null_space_basis(torch.eye(D_IN, dtype=torch.float64), 1e-3)
    with pytest.raises(ValueError, match="in \\(0, 1\\)"):
        solvers.null_space_basis(C, 1.5)
