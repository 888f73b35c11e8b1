"""EMMET: batched equality constraints, dW = R (K^T C'^-1 K + ridge I)^-1 K^T C'^-1.

Example: ``lmedit.edit(model, tok, requests, method="emmet", emmet_lambda=0.1)``
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lmedit.config import param
from lmedit.core import solvers
from lmedit.core.distribute import JointForm
from lmedit.methods.base import EditHParams, register_method


@dataclass(frozen=True)
class EmmetHParams(EditHParams):
    """EMMET (Gupta et al. 2024), C' = lambda C + mu I [+ P_e]."""

    mom2_update_weight: float = param(1.0, "lambda in C' = lambda C + mu I", gt=0)
    emmet_lambda: float = param(0.1, "ridge on the B x B matrix K^T C'^-1 K (the reference's emmet_lambda)", min=0)
    update_norm_lambda: float = param(0.0, "mu, a Frobenius-norm penalty on dW (C' = lambda C + mu I)", min=0)

    summary: ClassVar[str] = "equality-constrained batch edit (EMMET)"

    def solver(self):
        lam, ridge, mu, keep = self.mom2_update_weight, self.emmet_lambda, self.update_norm_lambda, self.preserve_edits

        def solve(R, K, system):
            return solvers.emmet(R, K, system.C, lam=lam, ridge=ridge, mu=mu, earlier=system.earlier if keep else None)
        return solve

    def joint_form(self) -> JointForm:
        lam, mu, keep = self.mom2_update_weight, self.update_norm_lambda, self.preserve_edits
        return JointForm("equality", lambda K, system: solvers.metric_solve(
            K, system.C, lam, mu, system.earlier if keep else None), self.emmet_lambda)


register_method("emmet", EmmetHParams)
