"""Reading activations at subject tokens: keys k (inputs of the edited projection) and the
residual stream z (block outputs) that targets are compared with.

Example: ``K = collect_keys(model, tok, adapter, requests, groups, layers=[4, 5])[4]  # (B, d_in)``
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lmedit.core.tokens import encode_subject_prompts, pad, pad_id, token_chunks
from lmedit.hooks import Trace
from lmedit.models.adapters import ModelAdapter
from lmedit.models.precision import model_device
from lmedit.requests import EditRequest

MAX_TOKENS = 8192  # padded tokens per forward pass


@torch.no_grad()
def read_at_subject(
    model: nn.Module,
    tokenizer,
    modules: dict[str, nn.Module],
    templates: Sequence[str],
    subjects: Sequence[str],
    *,
    capture: str = "input",
    max_tokens: int = MAX_TOKENS,
) -> dict[str, torch.Tensor]:
    """Inputs (or outputs) of ``modules`` at the subject's last token of each filled template.

    Returns float32 tensors (N, d) in the order of ``templates``. One forward pass per chunk
    reads every module and stops after the last of them.
    """
    seqs = encode_subject_prompts(tokenizer, templates, subjects)
    device = model_device(model)
    out: dict[str, torch.Tensor] = {}
    pid = pad_id(tokenizer)
    for group in token_chunks([len(s.ids) for s in seqs], max_tokens):
        ids, mask = pad([seqs[i].ids for i in group], pid, side="right")
        positions = torch.tensor([seqs[i].subject_last for i in group])
        with Trace(modules, capture=capture, positions=positions, stop=True) as tr:
            model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
        got = tr.inputs if capture == "input" else tr.outputs
        for name, x in got.items():
            if name not in out:
                out[name] = torch.empty(len(seqs), x.shape[-1], dtype=torch.float32)
            out[name][torch.tensor(group)] = x.float().cpu()
    return out


def collect_keys(
    model: nn.Module,
    tokenizer,
    adapter: ModelAdapter,
    requests: Sequence[EditRequest],
    template_groups: Sequence[Sequence[str]],
    layers: Sequence[int],
) -> dict[int, torch.Tensor]:
    """k* per request and layer: the edited projection's input at the last subject token,
    averaged within each template group, then across groups (MEMIT's ``compute_ks``).

    Returns {layer: (B, d_in) float32}.
    """
    flat = [t for g in template_groups for t in g]
    templates = [t.replace("{}", r.prompt, 1) for r in requests for t in flat]
    subjects = [r.subject for r in requests for _ in flat]
    mods = {str(layer): adapter.edit_module(model, layer) for layer in layers}
    acts = read_at_subject(model, tokenizer, mods, templates, subjects, capture="input")
    out = {}
    for layer in layers:
        x = acts[str(layer)].view(len(requests), len(flat), -1)  # (B, T, d_in)
        parts, start = [], 0
        for g in template_groups:
            parts.append(x[:, start:start + len(g)].mean(1))
            start += len(g)
        out[layer] = torch.stack(parts, 0).mean(0)
    return out


def residual_stream(
    model: nn.Module, tokenizer, adapter: ModelAdapter, requests: Sequence[EditRequest], layer: int
) -> torch.Tensor:
    """z: the output of block ``layer`` at the last subject token of each bare prompt, (B, d)."""
    acts = read_at_subject(model, tokenizer, {"z": adapter.block(model, layer)},
                           [r.prompt for r in requests], [r.subject for r in requests], capture="output")
    return acts["z"]
