"""Model adapters (edit points per architecture) and model loading."""

from lmedit.models.adapters import ModelAdapter, get_adapter, register_adapter, supported_model_types
from lmedit.models.loading import embedded_model_dir, fingerprint, load_model

__all__ = [
    "ModelAdapter", "get_adapter", "register_adapter", "supported_model_types",
    "load_model", "embedded_model_dir", "fingerprint",
]
