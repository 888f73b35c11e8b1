"""Retention metrics for long runs of edits: what the model still knows, and how much it changed.

Example::

    probe = RetentionProbe.build(model, tok, known_facts, heldout_texts, fluency_prompts)
    probe.measure(model, tok)   # {"known_retention": 100.0, "perplexity": 18.3, "fluency": 4.7}

Beside CounterFact's metrics over the edited facts (``lmedit.evaluate.runner.evaluate_requests``):

* known-fact retention: of the facts the unedited model answers correctly (every token of the
  answer is the teacher-forced argmax, e.g. ROME's ``known_1209.json``), the share it still does,
  and the mean log-probability of their answers' tokens (a graded measure: most facts a small
  model knows, it knows barely, so a count of flips moves in steps);
  with the facts' subjects known, also the share among those whose subject no edit so far names
  (an edit of "Catalonia is part of Europe" may rightly change "Catalonia belongs to the continent
  of");
* perplexity on held-out texts (not used for the statistics): exp of the mean token NLL;
* fluency: n-gram entropy (bits) of greedy continuations (``lmedit.evaluate.generation``);
* per-layer relative change of the edited weights, |W - W0| / |W0|.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lmedit.core.tokens import pad, pad_id, token_chunks
from lmedit.evaluate.generation import generation_entropy
from lmedit.evaluate.scoring import generate_texts, score_continuations
from lmedit.models.adapters import ModelAdapter, get_adapter
from lmedit.models.precision import model_device


def answered(model: nn.Module, tokenizer, prompts: Sequence[str], answers: Sequence[str]) -> list[bool]:
    """Per fact: every token of `` answer`` is the argmax after ``prompt`` (teacher forced)."""
    return answer_scores(model, tokenizer, prompts, answers)[0]


def answer_scores(model: nn.Module, tokenizer, prompts: Sequence[str],
                  answers: Sequence[str]) -> tuple[list[bool], list[float]]:
    """Per fact: whether it is answered (see :func:`answered`) and the mean log-probability of the
    answer's tokens (teacher forced), from one forward pass."""
    scored = score_continuations(model, tokenizer, prompts, answers)
    return [bool(ok.all()) for _, ok in scored], [float(lp.float().mean()) for lp, _ in scored]


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer, texts: Sequence[str], *, max_length: int = 256,
               max_tokens: int = 4096) -> float:
    """exp(mean NLL) over every predicted token of ``texts`` (each truncated to ``max_length`` tokens)."""
    adapter = get_adapter(model)
    decoder, head = adapter.decoder(model), adapter.unembed_module(model)
    enc = tokenizer(list(texts), add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
    device = model_device(model)
    nll, count = 0.0, 0
    for group in token_chunks([len(x) for x in enc], max_tokens):
        ids, mask = pad([enc[i] for i in group], pad_id(tokenizer), side="right")
        ids, mask = ids.to(device), mask.to(device)
        hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state  # (n, T, d)
        keep = mask[:, 1:].bool()  # positions that predict a real next token
        logp = torch.log_softmax(head(hidden[:, :-1][keep]).float(), -1)  # (M, V)
        nll -= float(logp.gather(1, ids[:, 1:][keep][:, None]).sum())
        count += int(keep.sum())
    return math.exp(nll / max(count, 1))


def relative_change(model: nn.Module, adapter: ModelAdapter, base: dict[int, torch.Tensor]) -> dict[int, float]:
    """|W_l - W0_l| / |W0_l| per layer, for the base weights ``base`` ({layer: W0 (d_out, d_in)})."""
    out = {}
    for layer, W0 in base.items():
        W = adapter.weight(model, layer).detach().to("cpu", torch.float64)
        out[layer] = float((W - W0.double()).norm() / W0.double().norm())
    return out


@dataclass
class RetentionProbe:
    """Fixed probes measured on the unedited model once, then after every so many edits."""

    known_prompts: list[str]  # facts the unedited model answers correctly
    known_answers: list[str]
    heldout: list[str]  # texts for perplexity
    fluency_prompts: list[str]
    fluency_tokens: int = 50
    known_subjects: list[str] | None = None  # per known fact, its subject (to set apart facts an edit names)

    def __post_init__(self):
        subjects = self.known_prompts if self.known_subjects is None else self.known_subjects
        if not len(self.known_prompts) == len(self.known_answers) == len(subjects):
            raise ValueError(f"known facts: {len(self.known_prompts)} prompts, {len(self.known_answers)} answers"
                             + (f", {len(self.known_subjects)} subjects" if self.known_subjects is not None else ""))

    @classmethod
    def build(cls, model: nn.Module, tokenizer, known_prompts: Sequence[str], known_answers: Sequence[str],
              heldout: Sequence[str], fluency_prompts: Sequence[str], fluency_tokens: int = 50,
              known_subjects: Sequence[str] | None = None) -> "RetentionProbe":
        """Keep the known facts the model answers correctly now."""
        ok = answered(model, tokenizer, known_prompts, known_answers)
        keep = [i for i, o in enumerate(ok) if o]
        return cls([known_prompts[i] for i in keep], [known_answers[i] for i in keep], list(heldout),
                   list(fluency_prompts), fluency_tokens,
                   None if known_subjects is None else [known_subjects[i] for i in keep])

    def measure(self, model: nn.Module, tokenizer, edited_subjects: Sequence[str] = ()) -> dict:
        """Known-fact retention (also per fact, ``known_ok``), the known answers' mean token
        log-probability (``known_logprob``: graded, where retention counts flips), perplexity and
        fluency now. With subjects,
        ``known_retention_others``: the share kept among the facts whose subject is none of
        ``edited_subjects`` (compared case-insensitively), ``known_others`` of them."""
        ok, logp = (answer_scores(model, tokenizer, self.known_prompts, self.known_answers) if self.known_prompts
                    else ([], []))
        texts = generate_texts(model, tokenizer, self.fluency_prompts, max_new_tokens=self.fluency_tokens)
        out = {"known_retention": 100.0 * sum(ok) / max(len(ok), 1), "known_facts": len(ok), "known_ok": ok,
               "known_logprob": sum(logp) / len(logp) if logp else float("nan")}
        if self.known_subjects is not None:
            edited = {s.casefold() for s in edited_subjects}
            others = [o for o, s in zip(ok, self.known_subjects) if s.casefold() not in edited]
            out.update(known_retention_others=100.0 * sum(others) / max(len(others), 1), known_others=len(others))
        out.update(perplexity=perplexity(model, tokenizer, self.heldout), fluency=generation_entropy(texts))
        return out
