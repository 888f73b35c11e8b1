"""ROME, MEMIT and EMMET: each a hyperparameter dataclass naming its closed form.

Example: ``lmedit.edit(model, tok, requests, method="emmet", layers=[4, 5, 6, 7, 8])``
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import ClassVar

from lmedit.core import solvers
from lmedit.methods.base import EditHParams, Method, register_method


@dataclass
class RomeHParams(EditHParams):
    """ROME: one layer, equality constraint, requests applied one after another."""

    layers: tuple[int, ...] = (6,)
    clamp_norm_factor: float = 4.0  # ROME's value (relative to the MLP output)
    context_templates: tuple[tuple[int, int], ...] = ((5, 10), (10, 10))  # ROME's 1 + 20 templates

    anchor: ClassVar[str] = "mlp"

    def validate(self) -> None:
        super().validate()
        if len(self.layers) != 1:
            from lmedit.errors import HyperparameterError

            raise HyperparameterError(f"ROME edits one layer; got layers={list(self.layers)} (use memit or emmet for several)")

    def solver(self):
        return partial(solvers.emmet, lam=self.mom2_update_weight, ridge=0.0)  # one key: exactly ROME's rank-one form


@dataclass
class MemitHParams(EditHParams):
    """MEMIT: least-squares memorization, dW = R K^T (lambda C + K K^T)^-1."""

    mom2_update_weight: float = 15000.0  # lambda (GPT-J's value; tune per model)

    def solver(self):
        return partial(solvers.memit, lam=self.mom2_update_weight)


@dataclass
class EmmetHParams(EditHParams):
    """EMMET: batched equality constraints, dW = R (K^T C'^-1 K + ridge I)^-1 K^T C'^-1."""

    mom2_update_weight: float = 1.0  # lambda in C' = lambda C + mu I
    emmet_lambda: float = 0.1  # ridge on the B x B matrix (the reference's emmet_lambda)
    update_norm_lambda: float = 0.0  # mu

    def validate(self) -> None:
        super().validate()
        from lmedit.errors import HyperparameterError

        if self.emmet_lambda < 0 or self.update_norm_lambda < 0:
            raise HyperparameterError(
                f"emmet_lambda ({self.emmet_lambda}) and update_norm_lambda ({self.update_norm_lambda}) must be >= 0")

    def solver(self):
        return partial(solvers.emmet, lam=self.mom2_update_weight, ridge=self.emmet_lambda, mu=self.update_norm_lambda)


register_method(Method("rome", RomeHParams, sequential=True, summary="rank-one equality edit, one request at a time"))
register_method(Method("memit", MemitHParams, sequential=False, summary="least-squares batch edit spread over layers"))
register_method(Method("emmet", EmmetHParams, sequential=False, summary="equality-constrained batch edit"))
