"""Evaluate edits on CounterFact-style and zsRE requests, before and after editing.

Example: ``metrics = evaluate_requests(model, tok, requests, kind="counterfact")``
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from torch import nn

from lmedit.evaluate.generation import generation_entropy
from lmedit.evaluate.metrics import PromptScores, RecordScores, counterfact_metrics, zsre_metrics
from lmedit.evaluate.scoring import generate_texts, score_continuations
from lmedit.requests import EditRequest


def record_scores(model: nn.Module, tokenizer, requests: Sequence[EditRequest], *, max_tokens: int = 8192) -> list[RecordScores]:
    """Teacher-forced scores of target_new / target_true on every prompt of every request (one batched pass)."""
    prefixes: list[str] = []
    conts: list[str] = []
    index: list[tuple[int, str]] = []  # (request, group) for each prompt
    for i, r in enumerate(requests):
        if r.target_true is None:
            raise ValueError(f"request {r.case_id}: CounterFact metrics need target_true")
        groups = (("rewrite", [r.text], r.target_true), ("paraphrase", list(r.paraphrase_prompts), r.target_true),
                  ("neighborhood", list(r.neighborhood_prompts), r.neighborhood_target))
        for group, prompts, true in groups:
            for p in prompts:
                prefixes += [p, p]
                conts += [r.target_new, true]
                index.append((i, group))
    scored = score_continuations(model, tokenizer, prefixes, conts, max_tokens=max_tokens)
    out = [RecordScores([], [], []) for _ in requests]
    for j, (i, group) in enumerate(index):
        (lp_new, ok_new), (lp_true, ok_true) = scored[2 * j], scored[2 * j + 1]
        getattr(out[i], group).append(PromptScores.from_logprobs(lp_new, lp_true, ok_new, ok_true))
    return out


def zsre_scores(model: nn.Module, tokenizer, requests: Sequence[EditRequest], *, max_tokens: int = 8192) -> dict[str, float]:
    """zsRE top-1 token accuracy (teacher forced) on the question, its rephrasing and the loc question."""
    prefixes, conts, kinds = [], [], []
    for r in requests:
        prefixes.append(r.text); conts.append(r.target_new); kinds.append("rw")
        for p in r.paraphrase_prompts:
            prefixes.append(p); conts.append(r.target_new); kinds.append("para")
        if r.neighborhood_target is not None:
            for p in r.neighborhood_prompts:
                prefixes.append(p); conts.append(r.neighborhood_target); kinds.append("loc")
    scored = score_continuations(model, tokenizer, prefixes, conts, max_tokens=max_tokens)
    flags = {"rw": [], "para": [], "loc": []}
    for (lp, ok), k in zip(scored, kinds):
        flags[k].append(ok.tolist())
    return zsre_metrics(flags["rw"], flags["para"], flags["loc"])


def evaluate_requests(
    model: nn.Module,
    tokenizer,
    requests: Sequence[EditRequest],
    *,
    kind: str = "counterfact",
    generation: bool = False,
    generation_tokens: int = 100,
    max_tokens: int = 8192,
) -> dict[str, Any]:
    """Metrics (x100) for ``requests`` on the model as it is now; ``kind`` is counterfact or zsre."""
    t0 = time.perf_counter()
    if kind == "zsre":
        metrics: dict[str, Any] = zsre_scores(model, tokenizer, requests, max_tokens=max_tokens)
    elif kind == "counterfact":
        metrics = counterfact_metrics(record_scores(model, tokenizer, requests, max_tokens=max_tokens))
    else:
        raise ValueError(f"kind must be 'counterfact' or 'zsre', got {kind!r}")
    if generation:
        prompts = [p for r in requests for p in r.generation_prompts]
        if prompts:
            texts = generate_texts(model, tokenizer, prompts, max_new_tokens=generation_tokens)
            metrics["generation_entropy"] = generation_entropy(texts)
    metrics["eval_s"] = time.perf_counter() - t0
    return metrics
