"""Editing methods: one hyperparameter dataclass each (fields, closed form), registered by name."""

from lmedit.methods.base import EditHParams, Method, get_method, method_names, register_method
from lmedit.methods.alphaedit import AlphaEditHParams
from lmedit.methods.emmet import EmmetHParams
from lmedit.methods.memit import EncoreHParams, MemitHParams
from lmedit.methods.rome import RomeHParams

__all__ = ["EditHParams", "Method", "get_method", "method_names", "register_method",
           "RomeHParams", "MemitHParams", "EmmetHParams", "EncoreHParams", "AlphaEditHParams"]
