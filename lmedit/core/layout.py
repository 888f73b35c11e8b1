"""Token layout of the target optimisation: sequences aligned so that every subject-last token
sits in one column S, and buckets of sequences by how many columns after S their loss reads.

Example: ``lay = build_layout(tok, requests, ["{}", "The ... . {}"]); lay.S  # the shared column``

Rows are (request, template) pairs in request-major order, then one KL row per request (the
prompt ``"{subject} is a"``); ``templates[0]`` must be the bare prompt ``"{}"``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from lmedit.core.tokens import SubjectSeq, encode_continuations, encode_subject_prompts, fill, pad_id
from lmedit.errors import RequestError
from lmedit.requests import EditRequest

KL_PROMPT = "{} is a"  # MEMIT's kl_prompts


@dataclass
class TargetLayout:
    """N sequences (B requests x T templates, then B KL rows) of width W, aligned at column S."""

    ids: torch.Tensor  # (N, W) token ids
    mask: torch.Tensor  # (N, W) attention mask
    pos: torch.Tensor  # (N, W) position ids
    S: int  # the column of every subject-last token
    req: torch.Tensor  # (N,) request index of each sequence
    is_kl: torch.Tensor  # (N,) bool: a KL row
    plain_rows: torch.Tensor  # (B,) the row of each request's bare prompt (template "{}")
    loss_rows: torch.Tensor  # (M,) sequence index of each target token
    loss_cols: torch.Tensor  # (M,) column (>= S) whose logits predict it
    loss_tok: torch.Tensor  # (M,) the target token id
    loss_w: torch.Tensor  # (M,) weight 1 / (len(target) * n_templates)
    loss_counted: torch.Tensor  # (M,) bool: its template counts for the most-probable stop

    def to(self, device: torch.device) -> "TargetLayout":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return TargetLayout(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in moved.items()})


@dataclass
class Bucket:
    """Sequences whose loss reads ``width`` columns from S (a power of 2), and their loss entries."""

    width: int
    seqs: torch.Tensor  # (n,) sequence indices
    entries: torch.Tensor  # (m,) indices into the layout's loss_* vectors


def _rows(requests: Sequence[EditRequest], templates: Sequence[str]) -> tuple[list[str], list[str], list[int], list[bool]]:
    """(filled template, subject, request index, is-KL) per sequence, request-major, KL rows last."""
    filled, subjects, req, kl = [], [], [], []
    for i, r in enumerate(requests):
        for t in templates:
            filled.append(t.replace("{}", r.prompt, 1))
            subjects.append(r.subject)
            req.append(i)
            kl.append(False)
    for i, r in enumerate(requests):
        filled.append(KL_PROMPT)
        subjects.append(r.subject)
        req.append(i)
        kl.append(True)
    return filled, subjects, req, kl


def build_layout(tokenizer, requests: Sequence[EditRequest], templates: Sequence[str],
                 counted: Sequence[bool] | None = None) -> TargetLayout:
    """Tokenise every (request, template) sequence with its target and align the subject-last tokens.
    ``counted`` (one per template, default all): the templates whose argmax the most-probable stop reads."""
    if not templates or templates[0] != "{}":
        raise ValueError(f"the first context template must be the bare prompt '{{}}', got {list(templates[:1])}")
    counted = [True] * len(templates) if counted is None else [bool(c) for c in counted]
    if len(counted) != len(templates) or not any(counted):
        raise ValueError(f"counted must hold one flag per template ({len(templates)}), at least one set; got {counted}")
    cont = encode_continuations(tokenizer, [r.text for r in requests], [r.target_new for r in requests])
    target_ids = [c for _, c in cont]  # target tokens of each request, read after its bare prompt
    filled, subjects, req_idx, kl = _rows(requests, templates)
    seqs: list[SubjectSeq] = encode_subject_prompts(tokenizer, filled, subjects)
    # a template that ends in whitespace (a chat template's assistant turn) is answered without the
    # leading space: its target tokens are read after its own text
    own = [j for j, (f, is_kl) in enumerate(zip(filled, kl)) if not is_kl and f[-1:].isspace()]
    own_ids = dict(zip(own, (c for _, c in encode_continuations(
        tokenizer, [fill(filled[j], subjects[j])[0] for j in own], [requests[req_idx[j]].target_new for j in own]))))
    full: list[list[int]] = []
    rows, cols_rel, toks, weights, counts = [], [], [], [], []
    for j, (s, i, is_kl) in enumerate(zip(seqs, req_idx, kl)):
        tgt = [] if is_kl else own_ids.get(j, target_ids[i])
        full.append(s.ids + tgt[:-1])
        for k, t in enumerate(tgt):
            rows.append(j)
            cols_rel.append(len(s.ids) - 1 + k - s.subject_last)  # relative to the subject-last column
            toks.append(t)
            weights.append(1.0 / (len(tgt) * len(templates)))
            counts.append(counted[j % len(templates)])  # target rows are request-major: j = i * T + template
    if min(cols_rel, default=0) < 0:
        raise RequestError("a target token is predicted before the subject's last token; check the prompts")
    S = max(s.subject_last for s in seqs)
    W = S + max(len(f) - s.subject_last for f, s in zip(full, seqs))
    ids = torch.full((len(full), W), pad_id(tokenizer), dtype=torch.long)
    mask = torch.zeros((len(full), W), dtype=torch.long)
    pos = torch.zeros((len(full), W), dtype=torch.long)
    for j, (f, s) in enumerate(zip(full, seqs)):
        left = S - s.subject_last
        ids[j, left:left + len(f)] = torch.tensor(f)
        mask[j, left:left + len(f)] = 1
        pos[j, left:] = torch.arange(W - left)
    return TargetLayout(
        ids=ids, mask=mask, pos=pos, S=S, req=torch.tensor(req_idx), is_kl=torch.tensor(kl),
        plain_rows=torch.arange(len(requests)) * len(templates),
        loss_rows=torch.tensor(rows, dtype=torch.long), loss_cols=torch.tensor(cols_rel, dtype=torch.long) + S,
        loss_tok=torch.tensor(toks, dtype=torch.long), loss_w=torch.tensor(weights, dtype=torch.float32),
        loss_counted=torch.tensor(counts, dtype=torch.bool),
    )


# What one pass of a bucket costs beyond its tokens, in tokens, by the device type the pass runs on.
# CPU: each pass reads every weight of the resumed blocks and the head once and runs the decoder's
# per-layer Python, which for a few rows costs as much as about 32 tokens of work (measured on a 2-core
# CPU with the embedded model: a 1-row matmul of a 576 x 1,536 bf16 weight takes as long as about 30
# rows; benchmarks/floors.py). CUDA: a pass costs its kernel launches, and more rows cost next to
# nothing, so buckets merge into one pass a step unless that pass would carry over 100,000 tokens of
# padding (on an H200 one ENCORE batch of 100 of the embedded model: targets 21-32 s with the CPU's
# layout and 64-request chunks, 3.0-4.7 s in one pass and one chunk; results/gpu/target_layout/
# h200_timings.json). Other device types (not measured) are costed as a CPU.
PASS_TOKENS: dict[str, int] = {"cpu": 32, "cuda": 100_000}


def pass_cost(device: torch.device | str | None) -> int:
    """:data:`PASS_TOKENS` for ``device`` (None: a CPU)."""
    kind = "cpu" if device is None else torch.device(device).type
    return PASS_TOKENS.get(kind, PASS_TOKENS["cpu"])


def buckets(lay: TargetLayout, pass_tokens: int | None = None, device: torch.device | str | None = None,
            among: torch.Tensor | None = None) -> list[Bucket]:
    """Group sequences by how many columns from S their loss needs (rounded up to a power of 2).

    A KL sequence needs one column, a rewrite sequence as many as reach its last target token.
    Running each group at its own width instead of the widest avoids computing padding; groups of
    neighbouring widths are merged where one wider pass costs less than separate ones (each pass
    counted as its rows x width plus ``pass_tokens``), which matters when there are few rows, e.g.
    a single request, whose lone KL row would otherwise make a pass of its own. ``pass_tokens``:
    default :func:`pass_cost` of ``device``, the device the passes run on (read at each call;
    ``benchmarks/target_profile.py --pass-tokens`` sets another cost to measure it). ``among``: (N,)
    bool, lay out only these sequences (the active requests' once some have stopped: a few requests
    left should not pay for the passes and widths laid out for many); default all.
    """
    pass_tokens = pass_cost(device) if pass_tokens is None else pass_tokens
    n_seq = lay.ids.shape[0]
    among = torch.ones(n_seq, dtype=torch.bool, device=lay.ids.device) if among is None else among.to(lay.ids.device)
    need = torch.ones(n_seq, dtype=torch.long, device=lay.ids.device)
    need.scatter_reduce_(0, lay.loss_rows, lay.loss_cols - lay.S + 1, reduce="amax", include_self=True)
    width = torch.tensor([1 << int(math.ceil(math.log2(max(1, n)))) for n in need.tolist()], device=need.device)
    width = torch.where(among, torch.clamp(width, max=lay.ids.shape[1] - lay.S), 0)  # 0: not laid out
    widths = sorted(set(width[among].tolist()))
    out = []
    for lo, hi in _merged(widths, [int((width == w).sum()) for w in widths], pass_tokens):
        in_bucket = (width >= widths[lo]) & (width <= widths[hi])
        seqs = torch.nonzero(in_bucket).squeeze(1)
        out.append(Bucket(int(widths[hi]), seqs, torch.nonzero(in_bucket[lay.loss_rows]).squeeze(1)))
    return out


def _merged(widths: list[int], rows: list[int], pass_tokens: int) -> list[tuple[int, int]]:
    """Consecutive runs (first, last index) of the sorted ``widths`` that minimise the summed cost
    sum over runs of (rows in the run x its widest width + pass_tokens): exact, by dynamic programming."""
    n = len(widths)
    best = [0.0] + [math.inf] * n  # best[i]: cost of the first i widths
    cut = [0] * (n + 1)
    for i in range(1, n + 1):
        for j in range(i):
            cost = best[j] + sum(rows[j:i]) * widths[i - 1] + pass_tokens
            if cost < best[i]:
                best[i], cut[i] = cost, j
    runs, i = [], n
    while i > 0:
        runs.append((cut[i], i - 1))
        i = cut[i]
    return runs[::-1]
