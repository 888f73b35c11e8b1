"""One-call conveniences over a temporary :class:`lmedit.Editor`.

Example::

    model, tok = lmedit.load_model()
    result = lmedit.edit(model, tok, [EditRequest("The mother tongue of {} is", "Danielle Darrieux",
                                                  "English", "French")], method="emmet")
    result.undo()          # the exact original weights again

For a series of edits (shared statistics and context templates, an undo stack, target reuse),
make an Editor and keep it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmedit.editor import Editor, EditResult
from lmedit.methods import EditHParams
from lmedit.requests import EditRequest


def edit(
    model: nn.Module,
    tokenizer,
    requests: Sequence[EditRequest | Mapping[str, Any]] | EditRequest,
    method: str | None = None,
    *,
    hparams: EditHParams | None = None,
    preset: str | None = None,
    covariances: Mapping[int, torch.Tensor] | None = None,
    context: Sequence[Sequence[str]] | None = None,
    progress: bool = False,
    keep_history: bool = True,
    **overrides: Any,
) -> EditResult:
    """Edit ``model`` in place so that each request's prompt continues with its ``target_new``.

    Example: ``res = edit(model, tok, reqs, method="memit", layers=[4, 5, 6, 7, 8], mom2_update_weight=1500)``

    The same as ``Editor(model, tokenizer, method, ...).edit(requests)`` (see :class:`lmedit.Editor`
    for the arguments); ``result.undo()`` restores the weights. The edit is atomic: if anything
    fails (a bad request, a singular solve, NaN, KeyboardInterrupt), no weight is left changed.
    """
    editor = Editor(model, tokenizer, method, hparams=hparams, preset=preset, covariances=covariances,
                    context=context, keep_history=keep_history, progress=progress, **overrides)
    return editor.edit(requests)


def apply_deltas(model: nn.Module, path: str | Path, *, allow_other_model: bool = False) -> EditResult:
    """Apply a delta file written by :meth:`EditResult.save_deltas` (refuses another base model).

    Example: ``lmedit.apply_deltas(model, "edits.safetensors").undo()``
    """
    return Editor(model, None).apply_deltas(path, allow_other_model=allow_other_model)
