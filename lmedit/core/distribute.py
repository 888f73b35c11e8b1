"""Edit-distribution algorithms: which layers are edited and how the residual is shared.

Example: ``info, timings = spread_over_layers(model, tok, adapter, tx, requests, groups, [4, 5, 6, 7, 8], z_star, C, solve)``

MEMIT's spread (``layers`` with more than one entry; one entry is the single-layer case): targets
z* are residual-stream vectors at the LAST layer of the range. For layer l_i (i = 0..L-1), with
the earlier layers already written:

    K_i  = keys at l_i (recomputed: earlier edits change them)
    R_i  = (z* - z_now) / (L - i)       z_now: output of the last layer on the bare prompts, now
    dW_i = solve(R_i, K_i, C_i)         the objective's closed form (MEMIT, EMMET, ROME ...)

so each layer takes an equal share of what is still missing. Any objective pairs with any
distribution: the solver is a plain function of (R, K, the layer's system).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lmedit.core.keys import collect_keys, residual_stream
from lmedit.core.weights import WeightTransaction
from lmedit.models.adapters import ModelAdapter
from lmedit.requests import EditRequest

log = logging.getLogger(__name__)

@dataclass
class LayerSystem:
    """What a layer's closed form reads besides R and K."""

    C: torch.Tensor  # (d_in, d_in) second moment of the preserved keys (a mean over corpus tokens)
    earlier: torch.Tensor | None = None  # (d_in, d_in) float64 sum of K_p K_p^T over earlier edits' keys
    null_basis: torch.Tensor | None = None  # (d_in, r) orthonormal basis of C's null space (AlphaEdit)


Solver = Callable[[torch.Tensor, torch.Tensor, LayerSystem], torch.Tensor]  # (R, K, system) -> dW


def spread_over_layers(
    model,
    tokenizer,
    adapter: ModelAdapter,
    tx: WeightTransaction,
    requests: Sequence[EditRequest],
    template_groups: Sequence[Sequence[str]],
    layers: Sequence[int],
    targets: torch.Tensor,
    systems: dict[int, LayerSystem],
    solve: Solver,
) -> tuple[dict[int, dict[str, float]], dict[str, float], dict[int, torch.Tensor]]:
    """Write the updates layer by layer into ``tx``.

    Returns (per-layer diagnostics, timings, keys): timings ``keys_s`` reading K, ``residual_s``
    re-reading z, ``solve_s`` the closed forms; keys {layer: K (B, d_in)} as each layer's solve used them.
    """
    z_layer = layers[-1]
    info: dict[int, dict[str, float]] = {}
    timings = {"keys_s": 0.0, "residual_s": 0.0, "solve_s": 0.0}
    keys: dict[int, torch.Tensor] = {}
    for i, layer in enumerate(layers):
        t0 = time.perf_counter()
        K = collect_keys(model, tokenizer, adapter, requests, template_groups, [layer])[layer]  # (B, d_in)
        t1 = time.perf_counter()
        z_now = residual_stream(model, tokenizer, adapter, requests, z_layer)  # (B, d)
        t2 = time.perf_counter()
        R = (targets - z_now) / (len(layers) - i)  # (B, d)
        dW = solve(R.T, K.T, systems[layer])  # (d_out, d_in) float64
        keys[layer] = K
        t3 = time.perf_counter()
        tx.add(layer, dW)
        info[layer] = {
            "residual_norm": float((targets - z_now).norm(dim=1).mean()),
            "update_norm": float(dW.norm()),
            "weight_norm": float(adapter.weight(model, layer).detach().float().norm()),
        }
        timings["keys_s"] += t1 - t0
        timings["residual_s"] += t2 - t1
        timings["solve_s"] += t3 - t2
        log.debug("layer %d: %s", layer, info[layer])
    return info, timings, keys
