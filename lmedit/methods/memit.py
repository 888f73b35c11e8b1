"""MEMIT: least-squares memorization, dW = R K^T (lambda C + K K^T)^-1, spread over layers.

Example: ``lmedit.edit(model, tok, requests, method="memit", mom2_update_weight=1500)``
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import ClassVar

from lmedit.config import param
from lmedit.core import solvers
from lmedit.methods.base import EditHParams, register_method


@dataclass(frozen=True)
class MemitHParams(EditHParams):
    """MEMIT (Meng et al. 2023)."""

    mom2_update_weight: float = param(15000.0, "lambda, the weight of C (GPT-J's value; tune per model)", gt=0)

    summary: ClassVar[str] = "least-squares batch edit spread over layers"

    def solver(self):
        return partial(solvers.memit, lam=self.mom2_update_weight)


register_method("memit", MemitHParams)
