"""Editing methods: hyperparameters + closed form, registered by name."""

from lmedit.methods.base import EditHParams, Method, get_method, method_names, register_method
from lmedit.methods.objectives import EmmetHParams, MemitHParams, RomeHParams

__all__ = ["EditHParams", "Method", "get_method", "method_names", "register_method",
           "RomeHParams", "MemitHParams", "EmmetHParams"]
