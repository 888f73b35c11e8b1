"""Tokenisation with subject positions, continuations and padding.

Example: ``seqs = encode_subject_prompts(tok, ["The capital of {} is"], ["France"])``

Subject positions are found from character offsets of the *whole* prompt, so a subject that
tokenises differently at the start of a text, or after a space, is located correctly; padding is
applied by lmedit itself (:func:`pad`), so positions never depend on the tokenizer's padding side.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmedit.errors import RequestError


@dataclass(frozen=True)
class SubjectSeq:
    """Token ids of one prompt and the index of its subject's last token."""

    ids: list[int]
    subject_last: int  # index in ids of the last token overlapping the subject


def fill(template: str, subject: str) -> tuple[str, int]:
    """``template`` with its single "{}" replaced by ``subject``, and the subject's end offset."""
    start = template.find("{}")
    if start < 0:
        raise RequestError(f"prompt {template!r} has no '{{}}' where the subject goes")
    return template[:start] + subject + template[start + 2:], start + len(subject)


def encode_subject_prompts(tokenizer, templates: Sequence[str], subjects: Sequence[str]) -> list[SubjectSeq]:
    """Tokenise ``template.format(subject)`` for each pair and locate the subject's last token."""
    texts, ends = zip(*(fill(t, s) for t, s in zip(templates, subjects, strict=True))) if templates else ((), ())
    if not texts:
        return []
    enc = tokenizer(list(texts), add_special_tokens=True, return_offsets_mapping=True)
    out = []
    for i, (ids, offsets) in enumerate(zip(enc["input_ids"], enc["offset_mapping"])):
        end = ends[i]
        last = -1
        for j, (a, b) in enumerate(offsets):
            if b > a and a < end:
                last = j
        if last < 0:
            raise RequestError(f"subject {subjects[i]!r} not found among the tokens of {texts[i]!r}")
        out.append(SubjectSeq(list(ids), last))
    return out


def encode_continuations(tokenizer, prefixes: Sequence[str], continuations: Sequence[str]) -> list[tuple[list[int], list[int]]]:
    """(prefix ids, continuation ids) with the continuation preceded by one space, or by nothing
    after a prefix that ends in whitespace (a chat template's "assistant\\n").

    The continuation's tokens are those of ``prefix + " " + continuation`` beyond the prefix's
    own tokens, so SentencePiece and BPE tokenizers both give the tokens the model would read;
    where the joint tokenisation does not extend the prefix's, the continuation is tokenised alone.
    """
    if not prefixes:
        return []
    conts = [("" if p[-1:].isspace() else " ") + c.strip() for p, c in zip(prefixes, continuations, strict=True)]
    p_ids = tokenizer(list(prefixes), add_special_tokens=True)["input_ids"]
    f_ids = tokenizer([p + c for p, c in zip(prefixes, conts, strict=True)], add_special_tokens=True)["input_ids"]
    out = []
    for i, (p, f) in enumerate(zip(p_ids, f_ids)):
        if f[: len(p)] == p and len(f) > len(p):
            c = f[len(p):]
        else:
            c = tokenizer(conts[i], add_special_tokens=False)["input_ids"]
        if not c:
            raise RequestError(f"continuation {continuations[i]!r} tokenises to nothing")
        out.append((list(p), list(c)))
    return out


def pad(seqs: Sequence[Sequence[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to (B, T) ``input_ids`` and ``attention_mask`` (left padding shifts positions by T - len)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        n = len(s)
        if side == "right":
            ids[i, :n] = torch.tensor(s, dtype=torch.long)
            mask[i, :n] = 1
        else:
            ids[i, width - n:] = torch.tensor(s, dtype=torch.long)
            mask[i, width - n:] = 1
    return ids, mask


def pad_id(tokenizer) -> int:
    pid = tokenizer.pad_token_id
    if pid is None:
        pid = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return int(pid)


# Padding share at which a batch of short texts (prompts) is cut: measured on 64 CounterFact records
# prompts, 9.0k padded tokens for 8.6k real in 16 passes, against 15.4k in 2 passes without it, and
# small batches that stay in cache (benchmarks/run.py, evaluation).
MAX_PADDING = 0.1


def token_chunks(lengths: Sequence[int], max_tokens: int, *, max_padding: float | None = None) -> list[list[int]]:
    """Group indices (sorted by length) so each group's padded size stays under ``max_tokens``;
    ``max_padding``: also start a new group where padding would exceed that share of the group's
    padded tokens (forward passes over short texts: less padding, and batches that stay in cache)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    cur: list[int] = []
    total = 0
    for i in order:
        size = (len(cur) + 1) * lengths[i]
        if cur and (size > max_tokens or (max_padding is not None and size - total - lengths[i] > max_padding * size)):
            groups.append(cur)
            cur, total = [], 0
        cur.append(i)
        total += lengths[i]
    if cur:
        groups.append(cur)
    return groups
