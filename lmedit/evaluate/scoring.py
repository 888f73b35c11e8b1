"""Batched teacher-forced scoring of continuations: the only place evaluation runs the model.

Example: ``lp, ok = score_continuations(model, tok, ["The capital of France is"], ["Paris"])[0]``

A pair needs only ``prefix + continuation[:-1]`` as input (the last token is predicted, never
read). Inputs are shared: a prompt scored with two targets (CounterFact's target_new and
target_true) runs once when one input is a prefix of the other, e.g. whenever either target is a
single token, and is read at its own positions (causal attention makes them the same numbers).
The remaining inputs go through padded batches sorted by length (``max_tokens`` padded tokens per
pass); logits are computed only at the positions that predict continuation tokens, not over the
vocabulary at every position.
"""

from __future__ import annotations

from collections.abc import Sequence
from collections import defaultdict

import torch
from torch import nn

from lmedit.core.tokens import MAX_PADDING, encode_continuations, pad, pad_id, token_chunks
from lmedit.models.adapters import get_adapter
from lmedit.models.precision import model_device


@torch.no_grad()
def score_continuations(
    model: nn.Module,
    tokenizer,
    prefixes: Sequence[str],
    continuations: Sequence[str],
    *,
    max_tokens: int = 8192,
    with_argmax: bool = False,
) -> list[tuple[torch.Tensor, ...]]:
    """Per pair: (log-probs of each continuation token (n,), argmax-correct flags (n,) bool), and
    with ``with_argmax`` the argmax token ids (n,) as a third element.

    The continuation is read after one space (``" " + continuation``), as in CounterFact, or
    directly after a prefix that ends in whitespace (a chat template's assistant turn).
    """
    pairs = encode_continuations(tokenizer, prefixes, continuations)
    seqs, host = shared_inputs(pairs)
    hosted: list[list[int]] = [[] for _ in seqs]  # per input sequence, the pairs read from it
    for i, h in enumerate(host):
        hosted[h].append(i)
    adapter = get_adapter(model)
    device = model_device(model)
    base = adapter.decoder(model)
    unembed = adapter.unembed_module(model)
    pid = pad_id(tokenizer)
    out: list[tuple[torch.Tensor, ...] | None] = [None] * len(pairs)
    for group in token_chunks([len(s) for s in seqs], max_tokens, max_padding=MAX_PADDING):
        ids, mask = pad([seqs[h] for h in group], pid, side="right")
        hidden = base(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).last_hidden_state
        rows, cols, toks, read = [], [], [], []
        for r, h in enumerate(group):
            for i in hosted[h]:
                p, c = pairs[i]
                read.append(i)
                for k, t in enumerate(c):
                    rows.append(r)
                    cols.append(len(p) - 1 + k)
                    toks.append(t)
        at = hidden.device  # the final norm's device (a split model's last one)
        logits = unembed(hidden[torch.tensor(rows, device=at), torch.tensor(cols, device=at)]).float()
        lp = torch.log_softmax(logits, -1)
        toks_t = torch.tensor(toks, device=lp.device)
        tok_lp = lp.gather(1, toks_t[:, None]).squeeze(1).cpu()
        best = lp.argmax(-1)
        correct = (best == toks_t).cpu()
        best = best.cpu()
        start = 0
        for i in read:
            n = len(pairs[i][1])
            part = (tok_lp[start:start + n], correct[start:start + n])
            out[i] = (*part, best[start:start + n]) if with_argmax else part
            start += n
    return out  # type: ignore[return-value]


def shared_inputs(pairs: Sequence[tuple[list[int], list[int]]]) -> tuple[list[list[int]], list[int]]:
    """The input sequences to run for (prefix ids, continuation ids) pairs, and per pair the index of
    the one it is read from: each pair needs ``prefix + continuation[:-1]``; among pairs with the same
    prefix, an input that is a prefix of another's is read from the longer one."""
    by_prefix: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, (p, _) in enumerate(pairs):
        by_prefix[tuple(p)].append(i)
    seqs: list[list[int]] = []
    host = [0] * len(pairs)
    for group in by_prefix.values():
        need = {i: pairs[i][0] + pairs[i][1][:-1] for i in group}
        chosen: list[int] = []  # indices into seqs, longest first
        for i in sorted(group, key=lambda i: -len(need[i])):
            s = need[i]
            h = next((h for h in chosen if seqs[h][:len(s)] == s), None)
            if h is None:
                h = len(seqs)
                seqs.append(s)
                chosen.append(h)
            host[i] = h
    return seqs, host


@torch.no_grad()
def generate_texts(model: nn.Module, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 100,
                   batch_size: int = 32, do_sample: bool = False, seed: int = 0) -> list[str]:
    """Continuations of ``prompts`` (greedy by default; ``do_sample`` is the reference's top-k 5)."""
    device = model_device(model)
    pid = pad_id(tokenizer)
    texts: list[str] = []
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device], device_type=device.type):
        torch.manual_seed(seed)
        for s in range(0, len(prompts), batch_size):
            batch = list(prompts[s:s + batch_size])
            enc = tokenizer(batch, add_special_tokens=True)["input_ids"]
            ids, mask = pad(enc, pid, side="left")
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=do_sample,
                                 top_k=5 if do_sample else None, max_new_tokens=max_new_tokens, pad_token_id=pid,
                                 **({} if do_sample else {"temperature": None, "top_p": None}))
            for row in out[:, ids.shape[1]:]:
                texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts
