"""Edit-distribution algorithms: which layers are edited and how the residual is shared.

Example: ``spread_over_layers(ctx, layers=[4, 5, 6, 7, 8], targets=z_star, solve=memit_solver)``

MEMIT's spread (``layers`` with more than one entry; one entry is the single-layer case): targets
z* are residual-stream vectors at the LAST layer of the range. For layer l_i (i = 0..L-1), with
the earlier layers already written:

    K_i  = keys at l_i (recomputed: earlier edits change them)
    R_i  = (z* - z_now) / (L - i)       z_now: output of the last layer on the bare prompts, now
    dW_i = solve(R_i, K_i, C_i)         the objective's closed form (MEMIT, EMMET, ROME ...)

so each layer takes an equal share of what is still missing. Any objective pairs with any
distribution: the solver is a plain function of (R, K, C).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from lmedit.core.keys import collect_keys, residual_stream
from lmedit.core.weights import WeightTransaction
from lmedit.models.adapters import ModelAdapter
from lmedit.requests import EditRequest

log = logging.getLogger(__name__)

Solver = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (R, K, C) -> dW


def spread_over_layers(
    model,
    tokenizer,
    adapter: ModelAdapter,
    tx: WeightTransaction,
    requests: Sequence[EditRequest],
    template_groups: Sequence[Sequence[str]],
    layers: Sequence[int],
    targets: torch.Tensor,
    covariances: dict[int, torch.Tensor],
    solve: Solver,
    timings: dict[str, float] | None = None,
) -> dict[int, dict[str, float]]:
    """Write the updates layer by layer into ``tx``; returns per-layer diagnostics."""
    import time

    z_layer = layers[-1]
    info: dict[int, dict[str, float]] = {}
    for i, layer in enumerate(layers):
        t0 = time.perf_counter()
        K = collect_keys(model, tokenizer, adapter, requests, template_groups, [layer])[layer]  # (B, d_in)
        z_now = residual_stream(model, tokenizer, adapter, requests, z_layer)  # (B, d)
        t1 = time.perf_counter()
        R = (targets - z_now) / (len(layers) - i)  # (B, d)
        dW = solve(R.T, K.T, covariances[layer])  # (d_out, d_in) float64
        t2 = time.perf_counter()
        tx.add(layer, dW)
        W = adapter.weight(model, layer)
        info[layer] = {
            "residual_norm": float((targets - z_now).norm(dim=1).mean()),
            "update_norm": float(dW.norm()),
            "weight_norm": float(W.detach().float().norm()),
        }
        if timings is not None:
            timings["keys_s"] = timings.get("keys_s", 0.0) + (t1 - t0)
            timings["solve_s"] = timings.get("solve_s", 0.0) + (t2 - t1)
        log.debug("layer %d: %s", layer, info[layer])
    return info
