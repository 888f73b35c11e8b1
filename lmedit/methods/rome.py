"""ROME: one layer, equality constraint, requests applied one after another.

Example: ``lmedit.edit(model, tok, requests, method="rome", layers=[6])``
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lmedit.config import param
from lmedit.core import solvers
from lmedit.core.distribute import JointForm
from lmedit.methods.base import EditHParams, register_method


@dataclass(frozen=True)
class RomeHParams(EditHParams):
    """ROME (Meng et al. 2022): dW = r (C^-1 k)^T / (k^T C^-1 k), one request at a time."""

    layers: tuple[int, ...] = param((6,), "the one edited layer")
    clamp_norm_factor: float = param(4.0, "||delta|| <= factor * ||MLP output|| (ROME's value)", gt=0)
    context_templates: tuple[tuple[int, int], ...] = param(((5, 10), (10, 10)), "ROME's 1 + 20 templates")

    anchor: ClassVar[str] = "mlp"
    sequential: ClassVar[bool] = True
    summary: ClassVar[str] = "rank-one equality edit of one layer, one request at a time"

    def validate(self) -> None:
        super().validate()
        if len(self.layers) != 1:
            self.fail("layers", "one layer (ROME edits one; use memit or emmet for several)")

    def solver(self):
        lam, keep = self.mom2_update_weight, self.preserve_edits

        def solve(R, K, system):  # one key: EMMET with one key is exactly ROME's rank-one form
            return solvers.emmet(R, K, system.C, lam=lam, ridge=0.0, earlier=system.earlier if keep else None)
        return solve

    def joint_form(self) -> JointForm:
        lam, keep = self.mom2_update_weight, self.preserve_edits
        return JointForm("equality", lambda K, system: solvers.metric_solve(
            K, system.C, lam, 0.0, system.earlier if keep else None))


register_method("rome", RomeHParams)
