"""Reading activations at subject tokens: keys k (inputs of the edited projection) and the
residual stream z (block outputs) that targets are compared with.

Example: ``K = collect_keys(model, tok, adapter, requests, groups, layers=[4, 5])[4]  # (B, d_in)``
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from lmedit.core.hfcompat import only_blocks_after
from lmedit.core.tokens import MAX_PADDING, encode_subject_prompts, pad, pad_id, token_chunks
from lmedit.hooks import ReplaceInput, Trace
from lmedit.models.adapters import ModelAdapter
from lmedit.models.precision import model_device
from lmedit.requests import EditRequest

MAX_TOKENS = 8192  # padded tokens per forward pass


# Hidden states kept between passes of one PromptStates, at most (bytes), where no memory budget is
# known; beyond it every pass runs from the first block.
STATE_BYTES = 2 * 2**30


def state_bytes(budget: int | None) -> int:
    """What :class:`PromptStates` may keep between passes, for an edit phase allowed ``budget`` bytes:
    three quarters of it (the forward passes need the rest), ``STATE_BYTES`` where no budget is known.
    A batch of 4,096 requests with SmolLM2's 12 templates holds 1.6M prompt tokens, 3.4 GiB per
    float32 state: under the fixed 2 GiB of before, every pass of ``spread`` ran from the embeddings
    (35 block runs instead of 13 over layers 4-8)."""
    return STATE_BYTES if budget is None else budget * 3 // 4


class PromptStates:
    """Activations at the subject's last token of a fixed set of prompts, read again and again while
    the weights of some blocks change (a distribution writing one layer after another).

    Example::

        states = PromptStates(model, tok, adapter, templates, subjects, floor=4)
        k4 = states.read({"k": (4, adapter.edit_module(model, 4))})["k"]   # runs blocks 0..4
        ...  # write layer 4
        k5 = states.read({"k": (5, adapter.edit_module(model, 5))}, versions={4: 1})["k"]  # blocks 4..5

    The prompts are tokenised and batched once. A pass keeps the hidden states entering the block of
    its deepest read (and, on the first pass, those entering block ``floor``, the lowest block that
    will be written); a later pass whose reads all lie at or above a kept block starts there instead
    of at the embeddings, as long as no block below it was written since (``versions``: a write
    counter per layer, kept by the caller that writes). The blocks run on the same inputs in the
    same batches, so the activations equal those of full passes bit for bit. Kept: the ``floor``
    state and the newest, where three states (those two and the one a pass fills) fit
    ``state_bytes`` (else every pass starts at the embeddings).
    """

    def __init__(self, model: nn.Module, tokenizer, adapter: ModelAdapter | None, templates: Sequence[str],
                 subjects: Sequence[str], *, floor: int | None = None, max_tokens: int = MAX_TOKENS,
                 state_bytes: int = STATE_BYTES) -> None:
        self.model, self.adapter, self.floor = model, adapter, floor
        seqs = encode_subject_prompts(tokenizer, templates, subjects)
        pid = pad_id(tokenizer)
        self.n = len(seqs)
        self.groups = token_chunks([len(s.ids) for s in seqs], max_tokens, max_padding=MAX_PADDING)
        self.batches = [(*pad([seqs[i].ids for i in g], pid, side="right"),
                         torch.tensor([seqs[i].subject_last for i in g])) for g in self.groups]
        width = getattr(getattr(model, "config", None), "hidden_size", None) or 0
        padded = sum(ids.numel() for ids, _, _ in self.batches)
        # at most three states at once: the floor's, the newest kept, and the one a pass is filling
        size = next((p.element_size() for p in model.parameters() if p.is_floating_point()), 4)
        self.keep = adapter is not None and bool(width) and 3 * padded * width * size <= state_bytes
        self.kept: dict[int, tuple[dict[int, int], list[torch.Tensor]]] = {}  # block -> (versions then, states)
        self.passes: list[tuple[int, int]] = []  # (first block run, deepest block read) of each pass

    def _valid(self, block: int, then: dict[int, int], now: dict[int, int]) -> bool:
        return all(now.get(l, 0) == then.get(l, 0) for l in set(now) | set(then) if l < block)

    @torch.no_grad()
    def read(self, points: dict[str, tuple[int, nn.Module]], *, capture: str = "input",
             versions: dict[int, int] | None = None) -> dict[str, torch.Tensor]:
        """{name: (N, d) float32}: the input (or output) of each module at the subject's last token
        (``points``: name -> (index of the block it belongs to, module)), with the weights as they are now."""
        now = dict(versions or {})
        lo, hi = min(b for b, _ in points.values()), max(b for b, _ in points.values())
        self.kept = {b: kv for b, kv in self.kept.items() if self._valid(b, kv[0], now)}
        start = max((b for b in self.kept if b <= lo), default=0)
        hold = [b for b in {hi, self.floor} if self.keep and b is not None and start < b <= hi and b not in self.kept]
        blocks = {b: self.adapter.block(self.model, b) for b in {start, *hold}} if self.keep else {}
        modules = {name: m for name, (_, m) in points.items()}
        device = model_device(self.model)
        out: dict[str, torch.Tensor] = {}
        states: dict[int, list[torch.Tensor]] = {b: [] for b in hold}
        for j, (ids, mask, positions) in enumerate(self.batches):
            with contextlib.ExitStack() as stack:
                if start > 0:
                    stack.enter_context(only_blocks_after(self.adapter, self.model, start - 1))
                    stack.enter_context(ReplaceInput(blocks[start], self.kept[start][1][j]))
                held = stack.enter_context(Trace({str(b): blocks[b] for b in hold}, capture="input")) if hold else None
                with Trace(modules, capture=capture, positions=positions, stop=True) as tr:
                    self.model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            for b in hold:
                states[b].append(held.inputs[str(b)])
            got = tr.inputs if capture == "input" else tr.outputs
            for name, x in got.items():
                if name not in out:
                    out[name] = torch.empty(self.n, x.shape[-1], dtype=torch.float32)
                out[name][torch.tensor(self.groups[j])] = x.float().cpu()
        self.passes.append((start, hi))
        for b in hold:
            self.kept[b] = (now, states[b])
        newest = max(hold, default=None)
        self.kept = {b: kv for b, kv in self.kept.items() if b == self.floor or b == newest or (newest is None and b == start)}
        return out


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
    """Inputs (or outputs) of ``modules`` at the subject's last token of each filled template, one
    pass from the embeddings (see :class:`PromptStates` for repeated reads).

    Returns float32 tensors (N, d) in the order of ``templates``. One forward pass per chunk
    reads every module and stops after the last of them.
    """
    if not templates:
        return {}
    states = PromptStates(model, tokenizer, None, templates, subjects, max_tokens=max_tokens)
    return states.read({name: (0, m) for name, m in modules.items()}, capture=capture)


def key_prompts(requests: Sequence[EditRequest], template_groups: Sequence[Sequence[str]]) -> tuple[list[str], list[str]]:
    """(filled templates, subjects) the keys of ``requests`` are read from: every template of every
    group around each prompt, request by request."""
    flat = [t for g in template_groups for t in g]
    return [t.replace("{}", r.prompt, 1) for r in requests for t in flat], [r.subject for r in requests for _ in flat]


def collect_keys(
    model: nn.Module,
    tokenizer,
    adapter: ModelAdapter,
    requests: Sequence[EditRequest],
    template_groups: Sequence[Sequence[str]],
    layers: Sequence[int],
    *,
    states: PromptStates | None = None,
    versions: dict[int, int] | None = None,
) -> dict[int, torch.Tensor]:
    """k* per request and layer: the edited projection's input at the last subject token,
    averaged within each template group, then across groups (MEMIT's ``compute_ks``).

    ``states``: a :class:`PromptStates` of :func:`key_prompts` (``versions``: its write counters)
    for repeated reads. Returns {layer: (B, d_in) float32}.
    """
    n_flat = sum(len(g) for g in template_groups)
    if states is None:
        states = PromptStates(model, tokenizer, adapter, *key_prompts(requests, template_groups))
    acts = states.read({str(l): (l, adapter.edit_module(model, l)) for l in layers}, versions=versions)
    out = {}
    for layer in layers:
        x = acts[str(layer)].view(len(requests), n_flat, -1)  # (B, T, d_in)
        parts, start = [], 0
        for g in template_groups:
            parts.append(x[:, start:start + len(g)].mean(1))
            start += len(g)
        out[layer] = torch.stack(parts, 0).mean(0)
    return out


def bare_prompts(requests: Sequence[EditRequest]) -> tuple[list[str], list[str]]:
    """(prompts, subjects) of ``requests`` as they are, without context templates."""
    return [r.prompt for r in requests], [r.subject for r in requests]


def residual_stream(
    model: nn.Module, tokenizer, adapter: ModelAdapter, requests: Sequence[EditRequest], layer: int, *,
    states: PromptStates | None = None, versions: dict[int, int] | None = None,
) -> torch.Tensor:
    """z: the output of block ``layer`` at the last subject token of each bare prompt, (B, d)
    (``states``: a :class:`PromptStates` of :func:`bare_prompts` for repeated reads)."""
    if states is None:
        states = PromptStates(model, tokenizer, adapter, *bare_prompts(requests))
    return states.read({"z": (layer, adapter.block(model, layer))}, capture="output", versions=versions)["z"]
