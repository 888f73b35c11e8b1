"""lmedit: closed-form fact editing (ROME, MEMIT, EMMET) for Hugging Face causal LMs.

Example::

    import lmedit
    model, tok = lmedit.load_model()                       # the embedded SmolLM2-135M-Instruct
    editor = lmedit.Editor(model, tok, method="emmet")
    editor.edit([lmedit.EditRequest("The capital of {} is", "France", "Rome", "Paris")])   # in place
    editor.undo()
"""

from lmedit._version import __version__
from lmedit.errors import (
    CacheError, HyperparameterError, LmeditError, ModelLoadError, RequestError, SolveError,
    UnsupportedArchitectureError,
)
from lmedit.requests import EditRequest, load_requests
from lmedit.models import get_adapter, load_model, register_adapter
from lmedit.presets import resolve_hparams
from lmedit.core.distribute import register_distribution
from lmedit.core.targets import TargetResult
from lmedit.editor import Editor, EditResult, EditState
from lmedit.api import apply_deltas, edit
from lmedit import easyedit  # EasyEdit request fields and hyperparameter files
from lmedit.tracing import load_facts, trace

__all__ = [
    "__version__", "load_model", "load_requests", "EditRequest", "Editor", "EditResult", "EditState", "TargetResult", "edit",
    "apply_deltas", "easyedit", "trace", "load_facts", "resolve_hparams", "register_distribution", "get_adapter", "register_adapter", "LmeditError", "RequestError",
    "SolveError", "CacheError", "HyperparameterError", "ModelLoadError", "UnsupportedArchitectureError",
]
