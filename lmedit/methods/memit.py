"""MEMIT: least-squares memorization, dW = R K^T (lambda C + K K^T)^-1, spread over layers; and
ENCORE, MEMIT for lifelong editing (earlier edits' keys preserved, a norm ridge, MPES).

Example: ``lmedit.edit(model, tok, requests, method="memit", mom2_update_weight=1500)``
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lmedit.config import param
from lmedit.core import solvers
from lmedit.core.distribute import JointForm
from lmedit.methods.base import EditHParams, register_method


@dataclass(frozen=True)
class MemitHParams(EditHParams):
    """MEMIT (Meng et al. 2023): dW = R K^T (lambda C + mu I + [P_e] + K K^T)^-1."""

    mom2_update_weight: float = param(15000.0, "lambda, the weight of C (GPT-J's value; tune per model)", gt=0)
    update_norm_lambda: float = param(0.0, "mu, a Frobenius-norm ridge on dW (ENCORE)", min=0)

    summary: ClassVar[str] = "least-squares batch edit (MEMIT)"

    def solver(self):
        lam, mu, keep = self.mom2_update_weight, self.update_norm_lambda, self.preserve_edits

        def solve(R, K, system):
            return solvers.memit(R, K, system.C, lam=lam, mu=mu, earlier=system.earlier if keep else None)
        return solve

    def joint_form(self) -> JointForm:
        lam, mu, keep = self.mom2_update_weight, self.update_norm_lambda, self.preserve_edits
        return JointForm("least_squares", lambda K, system: solvers.metric_solve(
            K, system.C, lam, mu, system.earlier if keep else None))


@dataclass(frozen=True)
class EncoreHParams(MemitHParams):
    """ENCORE (Gupta et al. 2025): MEMIT + earlier keys + mu I + most-probable early stopping.

    Defaults from the authors' Llama-2-7B file (scalable-model-editing/knowledge-editing-regularization,
    hparams/ENCORE): mu = 10, MPES with 2 extra steps; lambda is the model's MEMIT value.
    """

    update_norm_lambda: float = param(10.0, "mu, the Frobenius-norm ridge on dW", min=0)
    preserve_edits: bool = param(True, "preserve the keys of earlier edits (sum K_p K_p^T)")
    early_stop: str = param("most_probable", "stopping rule of the target optimisation (MPES)",
                            choices=("loss", "most_probable"))

    summary: ClassVar[str] = "MEMIT for lifelong editing: earlier keys preserved, norm ridge, MPES"


register_method("memit", MemitHParams)
register_method("encore", EncoreHParams)
