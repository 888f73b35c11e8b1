"""Evaluate edits on CounterFact-style and zsRE requests, before and after editing.

Example: ``metrics = evaluate_requests(model, tok, requests, kind="counterfact")``
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from lmedit.chat import chat_prompt
from lmedit.evaluate.generation import generation_entropy
from lmedit.evaluate.metrics import PromptScores, RecordScores, counterfact_metrics, locality_agreement, zsre_metrics
from lmedit.evaluate.scoring import generate_texts, score_continuations
from lmedit.models.precision import COMPUTE_DTYPES, working_copy
from lmedit.requests import EditRequest

# The dtype evaluation's forward passes run in: the model's own. bfloat16 ("bfloat16", or "auto":
# bfloat16 where its matmuls are native) is about twice as fast on this project's CPUs but does not
# agree with float32 to 0.1 point: measured on the embedded model (benchmarks/eval_dtype.py,
# results/eval_dtype) PS differs by 0.4 points on 256 unedited records and 1.6 on 64 edited ones;
# use it for quick looks, not for reported numbers.
EVAL_DTYPE = "model"


def _form(tokenizer, chat: bool) -> Callable[[str], str]:
    """How prompts are put to the model: as they are, or as the user turn of the chat template."""
    return (lambda p: chat_prompt(tokenizer, p)) if chat else (lambda p: p)


def record_scores(model: nn.Module, tokenizer, requests: Sequence[EditRequest], *, chat: bool = False,
                  max_tokens: int = 8192) -> list[RecordScores]:
    """Teacher-forced scores of target_new / target_true on every prompt of every request (one batched
    pass); ``chat``: each prompt as the user turn of the chat template, the target in the assistant turn."""
    form = _form(tokenizer, chat)
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
                prefixes += [form(p), form(p)]
                conts += [r.target_new, true]
                index.append((i, group))
    scored = score_continuations(model, tokenizer, prefixes, conts, max_tokens=max_tokens)
    out = [RecordScores([], [], []) for _ in requests]
    for j, (i, group) in enumerate(index):
        (lp_new, ok_new), (lp_true, ok_true) = scored[2 * j], scored[2 * j + 1]
        getattr(out[i], group).append(PromptScores.from_logprobs(lp_new, lp_true, ok_new, ok_true))
    return out


def zsre_scores(model: nn.Module, tokenizer, requests: Sequence[EditRequest], *, chat: bool = False,
                max_tokens: int = 8192) -> dict[str, float]:
    """zsRE top-1 token accuracy (teacher forced) on the question, its rephrasing and the loc question."""
    prefixes, conts, kinds = [], [], []
    for r in requests:
        prefixes.append(r.text); conts.append(r.target_new); kinds.append("rw")
        for p in r.paraphrase_prompts:
            prefixes.append(p); conts.append(r.target_new); kinds.append("para")
        if r.neighborhood_target is not None:
            for p in r.neighborhood_prompts:
                prefixes.append(p); conts.append(r.neighborhood_target); kinds.append("loc")
    form = _form(tokenizer, chat)
    scored = score_continuations(model, tokenizer, [form(p) for p in prefixes], conts, max_tokens=max_tokens)
    flags = {"rw": [], "para": [], "loc": []}
    for (lp, ok), k in zip(scored, kinds):
        flags[k].append(ok.tolist())
    return zsre_metrics(flags["rw"], flags["para"], flags["loc"])


class EasyEditMetrics:
    """EasyEdit's accuracy-style metrics under EasyEdit's names, x100 (see ``docs/easyedit.md``):

    * ``rewrite_acc``: per rewrite prompt, the share of target_new's tokens that are the argmax
      under teacher forcing (EasyEdit's ``test_prediction_acc``), averaged per record, then over records;
    * ``rephrase_acc``: the same on the paraphrase prompts;
    * ``locality``: per neighbourhood prompt, the share of its answer's positions (teacher forced)
      whose argmax token is the same as on the model this object was made with (the unedited one).

    Example: ``ee = EasyEditMetrics(model, tok, reqs); editor.edit(reqs); ee(model, tok, reqs)``
    """

    def __init__(self, model: nn.Module, tokenizer, requests: Sequence[EditRequest], *, max_tokens: int = 8192,
                 dtype: str = EVAL_DTYPE) -> None:
        self.max_tokens, self.dtype = max_tokens, dtype
        with working_copy(model, dtype) as work:  # the dtype later calls compare in
            self.reference = {id(r): toks for r, toks in zip(requests, self._locality_tokens(work, tokenizer, requests))}

    def _locality_tokens(self, model, tokenizer, requests) -> list[list[torch.Tensor]]:
        pairs = [(i, p) for i, r in enumerate(requests) if r.neighborhood_target is not None for p in r.neighborhood_prompts]
        scored = score_continuations(model, tokenizer, [p for _, p in pairs],
                                     [requests[i].neighborhood_target for i, _ in pairs], max_tokens=self.max_tokens,
                                     with_argmax=True)
        out: list[list[torch.Tensor]] = [[] for _ in requests]
        for (i, _), (_, _, best) in zip(pairs, scored):
            out[i].append(best)
        return out

    def __call__(self, model: nn.Module, tokenizer, requests: Sequence[EditRequest]) -> dict[str, float]:
        missing = [r.case_id for r in requests if id(r) not in self.reference]
        if missing:
            raise ValueError(f"EasyEditMetrics: requests {missing[:5]} were not among those it was made with")
        with working_copy(model, self.dtype) as work:
            return self._metrics(work, tokenizer, requests)

    def _metrics(self, model: nn.Module, tokenizer, requests: Sequence[EditRequest]) -> dict[str, float]:
        prefixes, conts, where = [], [], []
        for i, r in enumerate(requests):
            for kind, prompts in (("rewrite", [r.text]), ("rephrase", r.paraphrase_prompts)):
                for p in prompts:
                    prefixes.append(p); conts.append(r.target_new); where.append((i, kind))
        scored = score_continuations(model, tokenizer, prefixes, conts, max_tokens=self.max_tokens)
        per: dict[str, list[list[float]]] = {"rewrite": [[] for _ in requests], "rephrase": [[] for _ in requests]}
        for (i, kind), (_, ok) in zip(where, scored):
            per[kind][i].append(float(ok.double().mean()))
        now = self._locality_tokens(model, tokenizer, requests)
        loc = [[locality_agreement(a, b) for a, b in zip(self.reference[id(r)], now[i])] for i, r in enumerate(requests)]
        out = {}
        for name, values in (("rewrite_acc", per["rewrite"]), ("rephrase_acc", per["rephrase"]), ("locality", loc)):
            rec = [sum(v) / len(v) for v in values if v]
            if rec:
                out[name] = 100.0 * sum(rec) / len(rec)
        return out


def evaluate_requests(
    model: nn.Module,
    tokenizer,
    requests: Sequence[EditRequest],
    *,
    kind: str = "counterfact",
    generation: bool = False,
    generation_tokens: int = 100,
    chat: bool = False,
    easyedit: EasyEditMetrics | None = None,
    max_tokens: int = 8192,
    dtype: str = EVAL_DTYPE,
) -> dict[str, Any]:
    """Metrics (x100) for ``requests`` on the model as it is now; ``kind`` is counterfact or zsre.

    ``chat``: the same metrics again with every prompt as the user turn of the tokenizer's chat
    template and the targets in the assistant turn, under names with a ``chat_`` prefix.
    ``easyedit``: also EasyEdit's rewrite_acc / rephrase_acc / locality (see :class:`EasyEditMetrics`;
    it compares in its own dtype). ``dtype``: of the forward passes (see :data:`EVAL_DTYPE`;
    "model" keeps the model's own); generation always runs on the model itself.
    """
    t0 = time.perf_counter()
    if kind not in ("counterfact", "zsre"):
        raise ValueError(f"kind must be 'counterfact' or 'zsre', got {kind!r}")
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {dtype!r}")
    with working_copy(model, dtype) as work:
        metrics = _scores(work, tokenizer, requests, kind, chat, max_tokens)
    if easyedit is not None:
        metrics.update(easyedit(model, tokenizer, requests))
    if generation:
        prompts = [p for r in requests for p in r.generation_prompts]
        if prompts:
            texts = generate_texts(model, tokenizer, prompts, max_new_tokens=generation_tokens)
            metrics["generation_entropy"] = generation_entropy(texts)
    metrics["eval_s"] = time.perf_counter() - t0
    return metrics


def _scores(model: nn.Module, tokenizer, requests: Sequence[EditRequest], kind: str, chat: bool,
            max_tokens: int) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    for form in ((False, True) if chat else (False,)):
        if kind == "zsre":
            got = zsre_scores(model, tokenizer, requests, chat=form, max_tokens=max_tokens)
        else:
            got = counterfact_metrics(record_scores(model, tokenizer, requests, chat=form, max_tokens=max_tokens))
        metrics.update({("chat_" if form else "") + k: v for k, v in got.items()})
    return metrics
