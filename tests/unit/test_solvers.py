"""Closed-form solver identities on random SPD matrices (no model), in float64.

Symbols as in ``lmedit.core.solvers``: K (d_in, B) keys, R (d_out, B) residuals, C (d_in, d_in)
preserved-key second moment, lambda its weight.
"""

from __future__ import annotations

import pytest
import torch

from lmedit.core import solvers
from lmedit.errors import LmeditError, SolveError

D_IN, D_OUT, B = 24, 16, 5


def spd(d: int, seed: int, eps: float = 1e-3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(3 * d, d, generator=g, dtype=torch.float64)
    return X.T @ X / (3 * d) + eps * torch.eye(d, dtype=torch.float64)


def problem(seed: int = 0, b: int = B) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 100)
    R = torch.randn(D_OUT, b, generator=g, dtype=torch.float64)
    K = torch.randn(D_IN, b, generator=g, dtype=torch.float64)
    return R, K, spd(D_IN, seed)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("lam", [1.0, 1e3])
def test_emmet_without_ridge_meets_the_constraints_exactly(seed, lam):
    R, K, C = problem(seed)
    W = torch.randn(D_OUT, D_IN, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    dW = solvers.emmet(R, K, C, lam=lam, ridge=0.0)
    assert dW.shape == (D_OUT, D_IN) and dW.dtype == torch.float64
    assert rel(dW @ K, R) < 1e-8
    assert rel((W + dW) @ K, W @ K + R) < 1e-8


def test_emmet_with_ridge_does_not_meet_the_constraints_exactly():
    # the ridge trades memorization for a smaller update: the check above must be able to fail
    R, K, C = problem(0)
    dW0 = solvers.emmet(R, K, C, ridge=0.0)
    dW1 = solvers.emmet(R, K, C, ridge=10.0)
    assert rel(dW1 @ K, R) > 1e-3
    assert dW1.norm() < dW0.norm()


@pytest.mark.parametrize("seed", [0, 3])
def test_emmet_with_one_key_is_rome_and_the_rank_one_formula(seed):
    R, K, C = problem(seed, b=1)
    r, k = R[:, 0], K[:, 0]
    Cinv_k = torch.linalg.solve(C, k)  # (d_in,)
    explicit = torch.outer(r, Cinv_k) / (k @ Cinv_k)
    via_emmet = solvers.emmet(r[:, None], k[:, None], C, lam=1.0, ridge=0.0)
    via_rome = solvers.rome(r, k, C)
    assert rel(via_rome, explicit) < 1e-10
    assert rel(via_emmet, explicit) < 1e-10
    assert torch.linalg.matrix_rank(via_rome) == 1
    # ROME is independent of lambda's scale (it cancels between C^-1 k and k^T C^-1 k)
    assert rel(solvers.emmet(r[:, None], k[:, None], C, lam=123.0), explicit) < 1e-10


def test_memit_equals_its_explicit_formula():
    R, K, C = problem(0)
    for lam in (1e-2, 1.0, 1e4):
        explicit = R @ K.T @ torch.linalg.inv(lam * C + K @ K.T)
        assert rel(solvers.memit(R, K, C, lam=lam), explicit) < 1e-9


def test_memit_approaches_emmet_without_ridge_as_lambda_shrinks():
    R, K, C = problem(1)
    target = solvers.emmet(R, K, C, lam=1.0, ridge=0.0)
    errs = [rel(solvers.memit(R, K, C, lam=lam), target) for lam in (1.0, 1e-2, 1e-4, 1e-6)]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[0] > 1e-2  # far apart when preservation matters
    assert errs[-1] < 1e-4, errs
    # and MEMIT's memorization error vanishes with lambda too
    assert rel(solvers.memit(R, K, C, lam=1e-6) @ K, R) < 1e-4


@pytest.mark.parametrize("b", [B, 3 * D_IN])  # fewer keys than inputs, and more (K^T C'^-1 K singular)
@pytest.mark.parametrize("lam,mu,ridge", [(1.0, 0.0, 1e3), (1.0, 0.0, 0.1), (3.0, 0.5, 2.0)])
def test_emmet_with_a_ridge_is_memit_with_the_metric_scaled_by_it(b, lam, mu, ridge):
    # R (G + r I)^-1 (M^-1 K)^T = R (I + K^T (r M)^-1 K)^-1 ((r M)^-1 K)^T: EMMET's ridge r is MEMIT
    # with lambda r * lam (and mu r * mu, earlier keys weighted r): one family, not two objectives
    R, K, C = problem(3, b=b)
    earlier = problem(4, b=7)[1]
    P = earlier @ earlier.T
    emmet = solvers.emmet(R, K, C, lam=lam, ridge=ridge, mu=mu, earlier=P)
    assert rel(emmet, solvers.memit(R, K, C, lam=ridge * lam, mu=ridge * mu, earlier=ridge * P)) < 1e-8
    assert rel(emmet, solvers.memit(R, K, C, lam=lam, mu=mu, earlier=P)) > 1e-3  # unless r = 1


def test_emmet_mu_and_ridge_use_c_prime():
    R, K, C = problem(2)
    lam, mu, ridge = 3.0, 0.5, 0.2
    dW = solvers.emmet(R, K, C, lam=lam, ridge=ridge, mu=mu)
    assert torch.isfinite(dW).all()
    Cp = lam * C + mu * torch.eye(D_IN, dtype=torch.float64)
    Cinv_K = torch.linalg.solve(Cp, K)
    explicit = R @ torch.linalg.solve(K.T @ Cinv_K + ridge * torch.eye(B, dtype=torch.float64), Cinv_K.T)
    assert rel(dW, explicit) < 1e-9
    assert rel(dW, solvers.emmet(R, K, C, lam=lam, ridge=ridge)) > 1e-3  # mu changed the answer


def test_emmet_mu_makes_a_singular_c_solvable():
    R, K, _ = problem(0)
    Z = torch.zeros(D_IN, D_IN, dtype=torch.float64)
    dW = solvers.emmet(R, K, Z, lam=1.0, ridge=0.0, mu=1.0)  # C' = I: minimum-norm solution
    assert rel(dW @ K, R) < 1e-8
    assert rel(dW, R @ torch.linalg.pinv(K)) < 1e-8


def test_inputs_in_float32_are_solved_in_float64():
    R, K, C = problem(0)
    dW = solvers.emmet(R.float(), K.float(), C.float(), ridge=0.0)
    assert dW.dtype == torch.float64
    assert rel(dW @ K.float().double(), R.float().double()) < 1e-6


@pytest.mark.parametrize("solve", [
    lambda R, K, C: solvers.emmet(R, K, C, lam=1.0, ridge=0.0),
    lambda R, K, C: solvers.emmet(R, K, C, lam=1e-12, ridge=0.0),
], ids=["emmet", "emmet-small-lambda"])
def test_singular_c_raises_solve_error(solve):
    R, K, _ = problem(0)
    with pytest.raises(SolveError, match="not positive definite") as e:
        solve(R, K, torch.zeros(D_IN, D_IN, dtype=torch.float64))
    assert isinstance(e.value, LmeditError)
    assert "lambda" in str(e.value)  # says what to do


def test_rank_deficient_c_raises_solve_error():
    R, K, _ = problem(0)
    X = torch.randn(D_IN // 2, D_IN, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    C = X.T @ X  # rank d_in / 2
    with pytest.raises(SolveError, match="not positive definite"):
        solvers.emmet(R, K, C, lam=1e-6, ridge=0.0)
    with pytest.raises(SolveError):
        solvers.rome(R[:, 0], K[:, 0], C)


def test_memit_with_singular_c_and_too_few_keys_raises():
    R, K, _ = problem(0)
    with pytest.raises(SolveError, match="lambda \\* C \\+ mu I \\+ P_e \\+ K K\\^T"):
        solvers.memit(R, K, torch.zeros(D_IN, D_IN, dtype=torch.float64), lam=1.0)


def test_duplicate_keys_without_ridge_raise_but_ridge_fixes_them():
    R, K, C = problem(0)
    K = torch.cat([K[:, :1], K[:, :1]], dim=1)  # the same key twice: K^T C^-1 K is singular
    R = R[:, :2]
    with pytest.raises(SolveError, match="K\\^T C'\\^-1 K"):
        solvers.emmet(R, K, C, ridge=0.0)
    assert torch.isfinite(solvers.emmet(R, K, C, ridge=0.1)).all()


@pytest.mark.parametrize("bad", ["C", "K", "R"])
def test_nan_input_raises_solve_error_naming_it(bad):
    R, K, C = problem(0)
    x = {"R": R, "K": K, "C": C}
    x[bad] = x[bad].clone()
    x[bad][0, 0] = float("nan")
    for solve in (lambda R, K, C: solvers.emmet(R, K, C), lambda R, K, C: solvers.memit(R, K, C, lam=1.0)):
        with pytest.raises(SolveError, match="NaN|non-finite"):
            solve(x["R"], x["K"], x["C"])


def test_inf_in_c_raises_solve_error():
    R, K, C = problem(0)
    C = C.clone()
    C[1, 1] = float("inf")
    with pytest.raises(SolveError, match="NaN or inf"):
        solvers.emmet(R, K, C)


def test_shape_mismatches_raise_value_error():
    R, K, C = problem(0)
    with pytest.raises(ValueError, match="K .* and R"):
        solvers.emmet(R[:, :3], K, C)
    with pytest.raises(ValueError, match="C must be"):
        solvers.emmet(R, K, C[:-1, :-1])
    with pytest.raises(ValueError, match="C must be"):
        solvers.memit(R, K, C[:-1, :-1], lam=1.0)
    with pytest.raises(ValueError):
        solvers.memit(R[:, 0], K, C, lam=1.0)
    with pytest.raises(ValueError, match="one key"):
        solvers.rome(R, K, C)
    # a shape error is not a SolveError: it is a programming error, not an ill-conditioned system
    with pytest.raises(ValueError) as e:
        solvers.emmet(R, K[:-1], C)
    assert not isinstance(e.value, SolveError)


def test_blocked_gram_equals_full_product_and_is_symmetric():
    from lmedit.core.stats import gram

    torch.manual_seed(0)
    k = torch.randn(300, 130).bfloat16().float()  # keys of a bf16 forward
    full = k.double().T @ k.double()
    for blocks in (1, 2, 3, 6, 7):
        G = gram(k, blocks)
        assert torch.equal(G, G.T)
        torch.testing.assert_close(G.double(), full, rtol=1e-6, atol=1e-4)
