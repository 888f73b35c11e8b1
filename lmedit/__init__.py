"""lmedit: closed-form fact editing (ROME, MEMIT, EMMET) for Hugging Face causal LMs.

Example::

    import lmedit
    model, tok = lmedit.load_model()                       # the embedded SmolLM2-135M-Instruct
    reqs = [lmedit.EditRequest("The capital of {} is", "France", "Rome", "Paris")]
    result = lmedit.edit(model, tok, reqs, method="emmet")  # in place
    result.undo()
"""

__version__ = "0.1.0"

from lmedit.errors import (  # noqa: E402
    CacheError, HyperparameterError, LmeditError, ModelLoadError, RequestError, SolveError,
    UnsupportedArchitectureError,
)
from lmedit.requests import EditRequest, load_requests  # noqa: E402
from lmedit.models import get_adapter, load_model, register_adapter  # noqa: E402
from lmedit.api import EditResult, apply_deltas, edit, history, resolve_hparams  # noqa: E402

__all__ = [
    "__version__", "load_model", "load_requests", "EditRequest", "edit", "EditResult", "apply_deltas",
    "history", "resolve_hparams", "get_adapter", "register_adapter", "LmeditError", "RequestError",
    "SolveError", "CacheError", "HyperparameterError", "ModelLoadError", "UnsupportedArchitectureError",
]
