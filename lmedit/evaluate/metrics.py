"""CounterFact and zsRE edit metrics as pure functions of per-token log-probabilities.

No model and no tokenizer here: the caller runs the model once under teacher forcing and hands
over, per (prompt, continuation) pair, the log-probabilities of the continuation's tokens
(a 1-D float sequence, one entry per target token) and optionally whether each token was the
argmax. Everything below is plain arithmetic on those numbers, in float64 (so that a mean over
thousands of records is not rounded by the model's dtype).

Conventions follow the reference code of ROME / MEMIT (kmeng01/rome ``eval_utils_zsre.py``,
kmeng01/memit ``experiments/eval_utils_counterfact.py`` and ``experiments/summarize.py``):

* a target is scored by its MEAN per-token negative log-likelihood (sum of -log p over the target
  tokens divided by their number), so targets of different token lengths are comparable;
* "probability" p = exp(-mean NLL), i.e. the geometric-mean per-token probability, not the
  probability of the whole sequence;
* comparisons are strict: a tie between target_new and target_true counts as a failure;
* averages are taken per record first (over that record's prompts), then across records;
* reported numbers are multiplied by 100 (percentages), as ``summarize.py`` does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from lmedit.errors import LmeditError

__all__ = [
    "MetricError",
    "PromptScores",
    "RecordScores",
    "aggregate",
    "counterfact_metrics",
    "harmonic_mean",
    "locality_agreement",
    "mean_nll",
    "zsre_metrics",
    "zsre_token_accuracy",
]

# A 1-D float tensor, numpy array or list: one log-probability per target token.
LogProbs = torch.Tensor | Sequence[float]


class MetricError(LmeditError, ValueError):
    """Metric input that cannot be scored: empty, NaN, ragged or inconsistent."""


# --------------------------------------------------------------------------------------------
# Per-prompt scores
# --------------------------------------------------------------------------------------------


def _as_float64_1d(token_logprobs: LogProbs, what: str) -> torch.Tensor:
    if isinstance(token_logprobs, torch.Tensor):
        t = token_logprobs.detach().to(device="cpu", dtype=torch.float64)
    else:
        t = torch.as_tensor(token_logprobs, dtype=torch.float64)
    if t.dim() != 1:
        raise MetricError(
            f"{what}: expected a 1-D sequence of per-token log-probs, got shape {tuple(t.shape)}"
        )
    if t.numel() == 0:
        raise MetricError(f"{what}: no target tokens; a target must have at least one token")
    if torch.isnan(t).any():
        raise MetricError(f"{what}: log-probs contain NaN at positions {_nan_positions(t)}")
    return t


def _nan_positions(t: torch.Tensor) -> list[int]:
    return torch.nonzero(torch.isnan(t)).flatten().tolist()


def mean_nll(token_logprobs: LogProbs) -> float:
    """``mean_nll([-1.0, -3.0]) == 2.0``: mean per-token negative log-likelihood of a target.

    ``token_logprobs`` holds log p(target token t | prompt, earlier target tokens) for each of
    the target's T tokens (natural log, teacher forcing). Returns ``-(1/T) * sum_t logp_t``.
    The reference (``test_batch_prediction`` in MEMIT's ``eval_utils_counterfact.py``) divides
    the summed NLL by the target length in the same way, so a 1-token and a 3-token target are
    compared on the same per-token scale. Computed in float64. Raises :class:`MetricError`
    (a ``ValueError``) on an empty sequence or NaN.
    """
    t = _as_float64_1d(token_logprobs, "mean_nll")
    return float(-t.mean())


@dataclass
class PromptScores:
    """``PromptScores(nll_new=0.0, nll_true=math.log(2)).p_true == 0.5``: one prompt's scores.

    ``nll_new`` / ``nll_true`` are the mean per-token NLLs (see :func:`mean_nll`) of target_new
    and target_true after the prompt. ``correct_new`` / ``correct_true`` say whether EVERY
    token of that target is the model's argmax under teacher forcing (the reference's
    ``targets_correct``); ``None`` when the caller did not compute them.
    """

    nll_new: float  # mean per-token NLL of target_new (nats)
    nll_true: float  # mean per-token NLL of target_true (nats)
    correct_new: bool | None = None  # every target_new token is the argmax
    correct_true: bool | None = None  # every target_true token is the argmax

    @property
    def p_new(self) -> float:
        """exp(-nll_new): geometric-mean per-token probability of target_new."""
        return math.exp(-self.nll_new)

    @property
    def p_true(self) -> float:
        """exp(-nll_true): geometric-mean per-token probability of target_true."""
        return math.exp(-self.nll_true)

    @classmethod
    def from_logprobs(
        cls,
        new_logprobs: LogProbs,
        true_logprobs: LogProbs,
        new_correct: Sequence[bool] | torch.Tensor | None = None,
        true_correct: Sequence[bool] | torch.Tensor | None = None,
    ) -> PromptScores:
        """``PromptScores.from_logprobs([-0.1, -0.3], [-2.0])``: scores from per-token values.

        ``new_correct`` / ``true_correct`` are per-token argmax flags (one per target token);
        the prompt counts as correct when all of them are true.
        """
        return cls(
            nll_new=mean_nll(new_logprobs),
            nll_true=mean_nll(true_logprobs),
            correct_new=None if new_correct is None else _all_correct(new_correct, "new_correct"),
            correct_true=(
                None if true_correct is None else _all_correct(true_correct, "true_correct")
            ),
        )


def _all_correct(flags: Sequence[bool] | torch.Tensor, what: str) -> bool:
    values = [bool(f) for f in flags]
    if not values:
        raise MetricError(f"{what}: no per-token flags; a target must have at least one token")
    return all(values)


@dataclass
class RecordScores:
    """``RecordScores(rewrite=[PromptScores(0.1, 2.0)], paraphrase=[], neighborhood=[])``.

    The scores of one CounterFact record: its rewrite prompt(s) (efficacy), its paraphrase
    prompts (generalisation) and its neighborhood prompts (specificity: other subjects that
    share the relation and the TRUE object, on which target_true should stay preferred).
    An empty list means the record has no prompts of that kind; it is skipped for that metric.
    """

    rewrite: list[PromptScores]
    paraphrase: list[PromptScores]
    neighborhood: list[PromptScores]


# --------------------------------------------------------------------------------------------
# CounterFact
# --------------------------------------------------------------------------------------------


def _check_finite(records: Sequence[RecordScores]) -> None:
    for i, rec in enumerate(records):
        for group in ("rewrite", "paraphrase", "neighborhood"):
            for j, ps in enumerate(getattr(rec, group)):
                for field in ("nll_new", "nll_true"):
                    value = getattr(ps, field)
                    if math.isnan(value):
                        raise MetricError(
                            f"record {i}: {group}[{j}].{field} is NaN; the model produced "
                            "non-finite log-probs (check dtype overflow or a broken edit)"
                        )


def _record_mean(records: Sequence[RecordScores], group: str, per_prompt) -> float | None:
    """Mean over records of (mean over the record's ``group`` prompts of ``per_prompt``)."""
    per_record = []
    for rec in records:
        prompts = getattr(rec, group)
        if prompts:
            per_record.append(sum(float(per_prompt(p)) for p in prompts) / len(prompts))
    if not per_record:
        return None
    return sum(per_record) / len(per_record)


def _record_accuracy(records: Sequence[RecordScores], group: str) -> float | None:
    """Mean over records of the share of ``group`` prompts whose ``correct_new`` is true."""
    per_record = []
    for i, rec in enumerate(records):
        flags = [p.correct_new for p in getattr(rec, group)]
        if not flags or all(f is None for f in flags):
            continue
        if any(f is None for f in flags):
            raise MetricError(
                f"record {i}: only some {group} prompts have correct_new set ({flags}); "
                "set it on all of them or on none"
            )
        per_record.append(sum(bool(f) for f in flags) / len(flags))
    if not per_record:
        return None
    return sum(per_record) / len(per_record)


def harmonic_mean(values: Sequence[float]) -> float:
    """``harmonic_mean([50.0, 100.0]) == 66.66...``; 0 if any value is 0 (as scipy's hmean).

    Raises :class:`MetricError` on an empty sequence or a negative value.
    """
    if not values:
        raise MetricError("harmonic_mean: no values")
    if any(v < 0 for v in values):
        raise MetricError(f"harmonic_mean: values must be >= 0, got {list(values)}")
    if any(v == 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def counterfact_metrics(records: Sequence[RecordScores]) -> dict[str, float]:
    """``counterfact_metrics([RecordScores(...), ...])["score"]``: CounterFact metrics, x100.

    Per record, each metric is the mean over that record's prompts of the quantity below; the
    result is the mean of those per-record values (the reference ``summarize.py`` does the same).

    * ``efficacy_score`` (ES): rewrite prompts with nll_new < nll_true.
    * ``paraphrase_score`` (PS): the same on paraphrase prompts.
    * ``neighborhood_score`` (NS): neighborhood prompts with nll_true < nll_new.
    * ``efficacy_magnitude`` (EM): p_new - p_true on rewrite prompts, p = exp(-mean NLL).
    * ``paraphrase_magnitude`` (PM): the same on paraphrase prompts.
    * ``neighborhood_magnitude`` (NM): p_true - p_new on neighborhood prompts.
    * ``score`` (S): harmonic mean of ES, PS and NS (on the x100 values, as the reference);
      0 if any of them is 0; omitted if any of them is missing.
    * ``rewrite_accuracy`` / ``paraphrase_accuracy``: EasyEdit-style share of prompts whose
      target_new is entirely argmax (``correct_new``); omitted when no flags were given.

    Comparisons are strict (a tie is a failure). A record without prompts of some kind is
    skipped for that metric (not counted as 0); a metric with no data at all is omitted.
    Raises :class:`MetricError` (a ``ValueError``) when ``records`` is empty, holds no prompt
    at all, or any NLL is NaN (naming the record index).
    """
    if not records:
        raise MetricError("counterfact_metrics: no records to score")
    _check_finite(records)
    if not any(r.rewrite or r.paraphrase or r.neighborhood for r in records):
        raise MetricError(
            f"counterfact_metrics: none of the {len(records)} records has any prompt scores"
        )

    raw: dict[str, float | None] = {
        "efficacy_score": _record_mean(records, "rewrite", lambda p: p.nll_new < p.nll_true),
        "paraphrase_score": _record_mean(records, "paraphrase", lambda p: p.nll_new < p.nll_true),
        "neighborhood_score": _record_mean(
            records, "neighborhood", lambda p: p.nll_true < p.nll_new
        ),
        "efficacy_magnitude": _record_mean(records, "rewrite", lambda p: p.p_new - p.p_true),
        "paraphrase_magnitude": _record_mean(records, "paraphrase", lambda p: p.p_new - p.p_true),
        "neighborhood_magnitude": _record_mean(
            records, "neighborhood", lambda p: p.p_true - p.p_new
        ),
        "rewrite_accuracy": _record_accuracy(records, "rewrite"),
        "paraphrase_accuracy": _record_accuracy(records, "paraphrase"),
    }
    out = {k: 100.0 * v for k, v in raw.items() if v is not None}
    parts = ("efficacy_score", "paraphrase_score", "neighborhood_score")
    if all(k in out for k in parts):
        out["score"] = harmonic_mean([out[k] for k in parts])
    return out


# --------------------------------------------------------------------------------------------
# Locality (EasyEdit) and zsRE
# --------------------------------------------------------------------------------------------


def locality_agreement(
    pre_tokens: Sequence[int] | torch.Tensor, post_tokens: Sequence[int] | torch.Tensor
) -> float:
    """``locality_agreement([1, 2, 3, 4], [1, 2, 9, 4]) == 0.75``: EasyEdit locality.

    ``pre_tokens`` / ``post_tokens`` are the argmax token ids at the same positions (e.g. over
    the locality answer under teacher forcing) before and after the edit, shape (T,). Returns
    the FRACTION of positions where they agree, in [0, 1] (not x100). Raises
    :class:`MetricError` on empty or unequal-length input.
    """
    pre = [int(t) for t in pre_tokens]
    post = [int(t) for t in post_tokens]
    if len(pre) != len(post):
        raise MetricError(
            f"locality_agreement: pre has {len(pre)} tokens but post has {len(post)}; "
            "compare argmax tokens at the same positions"
        )
    if not pre:
        raise MetricError("locality_agreement: no tokens to compare")
    return sum(a == b for a, b in zip(pre, post)) / len(pre)


def zsre_token_accuracy(correct_flags: Sequence[Sequence[bool]]) -> float:
    """``zsre_token_accuracy([[True, False], [True]]) == 75.0``: zsRE top-1 accuracy, x100.

    ``correct_flags[i][t]`` says whether answer token t of example i is the model's argmax
    under teacher forcing (ROME's ``test_batch_prediction_acc``). Per example the flags are
    averaged over tokens, then the per-example values are averaged over examples (the
    reference's ``np.mean`` per record, then across records), so a long answer does not weigh
    more than a short one. Raises :class:`MetricError` on no examples or an empty example.
    """
    if len(correct_flags) == 0:
        raise MetricError("zsre_token_accuracy: no examples")
    per_example = []
    for i, flags in enumerate(correct_flags):
        values = [bool(f) for f in flags]
        if not values:
            raise MetricError(
                f"zsre_token_accuracy: example {i} has no answer tokens; drop it or fix its answer"
            )
        per_example.append(sum(values) / len(values))
    return 100.0 * sum(per_example) / len(per_example)


def zsre_metrics(
    rewrite_flags: Sequence[Sequence[bool]],
    paraphrase_flags: Sequence[Sequence[bool]],
    neighborhood_flags: Sequence[Sequence[bool]],
) -> dict[str, float]:
    """``zsre_metrics(rw, para, loc)["efficacy_accuracy"]``: zsRE metrics, x100.

    Each argument holds per-example, per-token argmax flags (see :func:`zsre_token_accuracy`):

    * ``efficacy_accuracy``: on the edit prompt's new answer;
    * ``paraphrase_accuracy``: on the paraphrased prompt's new answer;
    * ``specificity``: top-1 accuracy on the unrelated (``loc``) prompt's ``loc_ans`` tokens,
      the reference's neighborhood metric.

    An empty argument leaves its key out; all three empty raises :class:`MetricError`.
    """
    parts = {
        "efficacy_accuracy": rewrite_flags,
        "paraphrase_accuracy": paraphrase_flags,
        "specificity": neighborhood_flags,
    }
    out = {k: zsre_token_accuracy(v) for k, v in parts.items() if len(v) > 0}
    if not out:
        raise MetricError("zsre_metrics: no examples in any of rewrite/paraphrase/neighborhood")
    return out


# --------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------


def aggregate(
    values: Sequence[Mapping[str, float]], weights: Sequence[float] | None = None
) -> dict[str, float]:
    """``aggregate([{"a": 1.0}, {"a": 3.0, "b": 2.0}]) == {"a": 2.0, "b": 2.0}``.

    Mean per key over the dicts that have that key (missing keys are ignored, not counted as
    0). ``weights`` (e.g. batch sizes) makes it a weighted mean, so that batches of unequal
    size give the same result as scoring all records at once. Raises :class:`MetricError` on
    no dicts, or on weights of the wrong length or not positive.
    """
    if not values:
        raise MetricError("aggregate: no metric dicts to average")
    if weights is None:
        weights = [1.0] * len(values)
    if len(weights) != len(values):
        raise MetricError(f"aggregate: {len(values)} dicts but {len(weights)} weights")
    if any(w <= 0 for w in weights):
        raise MetricError(f"aggregate: weights must be > 0, got {list(weights)}")
    sums: dict[str, float] = {}
    totals: dict[str, float] = {}
    for d, w in zip(values, weights):
        for k, v in d.items():
            sums[k] = sums.get(k, 0.0) + w * float(v)
            totals[k] = totals.get(k, 0.0) + w
    return {k: sums[k] / totals[k] for k in sums}
