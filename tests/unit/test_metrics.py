"""Hand-computed checks of lmedit.evaluate.metrics and lmedit.evaluate.generation.

NLLs are chosen as 0, ln 2 and ln 4 so that p = exp(-nll) is 1, 1/2 and 1/4 and every expected
value below can be worked out on paper (the working is in the comments).
"""

from __future__ import annotations

import math

import pytest
import torch

from lmedit.evaluate.generation import generation_entropy, ngram_entropy, word_tokens
from lmedit.evaluate.metrics import (
    PromptScores,
    RecordScores,
    aggregate,
    counterfact_metrics,
    harmonic_mean,
    locality_agreement,
    mean_nll,
    zsre_metrics,
    zsre_token_accuracy,
)

L2 = math.log(2)  # p = 1/2
L4 = math.log(4)  # p = 1/4


def PS(nll_new: float, nll_true: float, correct_new: bool | None = None) -> PromptScores:
    return PromptScores(nll_new=nll_new, nll_true=nll_true, correct_new=correct_new)


# Record A
#   rewrite      (0, L2): new wins;              p_new - p_true = 1 - 1/2 = 0.5
#   paraphrase   (0, L4): new wins,  0.75;  (L2, 0): new loses, -0.5  -> PS 0.5,  PM 0.125
#   neighborhood (L2, 0): true wins, 0.5;   (L4, L2): true wins, 0.25 -> NS 1.0,  NM 0.375
RECORD_A = RecordScores(
    rewrite=[PS(0.0, L2, correct_new=True)],
    paraphrase=[PS(0.0, L4, correct_new=True), PS(L2, 0.0, correct_new=False)],
    neighborhood=[PS(L2, 0.0), PS(L4, L2)],
)
# Record B
#   rewrite      (L4, L2): new loses;            1/4 - 1/2 = -0.25
#   paraphrase   (L2, L4): new wins;             1/2 - 1/4 = 0.25     -> PS 1.0,  PM 0.25
#   neighborhood (0, L2) loses -0.5; (L2, 0) wins 0.5; (L4, 0) wins 0.75; (0, 0) tie loses 0
#                                                                     -> NS 0.5,  NM 0.1875
RECORD_B = RecordScores(
    rewrite=[PS(L4, L2, correct_new=False)],
    paraphrase=[PS(L2, L4, correct_new=True)],
    neighborhood=[PS(0.0, L2), PS(L2, 0.0), PS(L4, 0.0), PS(0.0, 0.0)],
)


def test_counterfact_metrics_hand_computed() -> None:
    m = counterfact_metrics([RECORD_A, RECORD_B])
    assert m["efficacy_score"] == pytest.approx(50.0)  # (1 + 0) / 2
    assert m["paraphrase_score"] == pytest.approx(75.0)  # (0.5 + 1) / 2, not pooled 2/3
    assert m["neighborhood_score"] == pytest.approx(75.0)  # (1 + 0.5) / 2
    assert m["efficacy_magnitude"] == pytest.approx(12.5)  # (0.5 - 0.25) / 2
    assert m["paraphrase_magnitude"] == pytest.approx(18.75)  # (0.125 + 0.25) / 2
    assert m["neighborhood_magnitude"] == pytest.approx(28.125)  # (0.375 + 0.1875) / 2
    # harmonic mean of 50, 75, 75 = 3 / (3/150 + 2/150 + 2/150) = 450 / 7
    assert m["score"] == pytest.approx(450 / 7)
    assert m["rewrite_accuracy"] == pytest.approx(50.0)  # (1 + 0) / 2
    assert m["paraphrase_accuracy"] == pytest.approx(75.0)  # (0.5 + 1) / 2
    assert set(m) == {
        "efficacy_score",
        "paraphrase_score",
        "neighborhood_score",
        "efficacy_magnitude",
        "paraphrase_magnitude",
        "neighborhood_magnitude",
        "score",
        "rewrite_accuracy",
        "paraphrase_accuracy",
    }


def test_record_without_paraphrases_is_skipped_not_zero() -> None:
    # C: rewrite (0, L2) wins with magnitude 0.5; no paraphrase or neighborhood prompts.
    record_c = RecordScores(rewrite=[PS(0.0, L2)], paraphrase=[], neighborhood=[])
    m = counterfact_metrics([RECORD_A, RECORD_B, record_c])
    assert m["efficacy_score"] == pytest.approx(200 / 3)  # (1 + 0 + 1) / 3
    assert m["efficacy_magnitude"] == pytest.approx(25.0)  # (0.5 - 0.25 + 0.5) / 3
    assert m["paraphrase_score"] == pytest.approx(75.0)  # C skipped: still (0.5 + 1) / 2
    assert m["neighborhood_score"] == pytest.approx(75.0)
    # C has no correct_new flags: skipped for rewrite_accuracy, still (1 + 0) / 2
    assert m["rewrite_accuracy"] == pytest.approx(50.0)


def test_metric_without_data_is_omitted() -> None:
    m = counterfact_metrics([RecordScores(rewrite=[PS(0.0, L2)], paraphrase=[], neighborhood=[])])
    assert m == pytest.approx({"efficacy_score": 100.0, "efficacy_magnitude": 50.0})


def test_harmonic_mean_with_zero_component() -> None:
    # every neighborhood prompt prefers target_new -> NS = 0 -> score = 0
    record = RecordScores(
        rewrite=[PS(0.0, L2)], paraphrase=[PS(0.0, L2)], neighborhood=[PS(0.0, L2)]
    )
    m = counterfact_metrics([record])
    assert m["efficacy_score"] == pytest.approx(100.0)
    assert m["neighborhood_score"] == 0.0
    assert m["neighborhood_magnitude"] == pytest.approx(-50.0)  # 1/2 - 1
    assert m["score"] == 0.0
    assert harmonic_mean([50.0, 100.0]) == pytest.approx(200 / 3)
    assert harmonic_mean([50.0, 0.0, 100.0]) == 0.0


def test_mean_nll_multi_token_and_length_normalisation() -> None:
    # -(log 1/2 + log 1/8) / 2 = (ln 2 + 3 ln 2) / 2 = 2 ln 2 -> p = 1/4
    assert mean_nll([-L2, -3 * L2]) == pytest.approx(2 * L2)
    assert mean_nll(torch.tensor([-L2, -3 * L2], dtype=torch.float16)) == pytest.approx(
        2 * L2, rel=1e-3
    )
    # 3-token target_new at 0.5 nats/token vs 1-token target_true at ln 2 = 0.693 nats:
    # summed NLL (1.5) would prefer target_true; the mean (0.5) prefers target_new.
    ps = PromptScores.from_logprobs([-0.5, -0.5, -0.5], [-L2], new_correct=[True, True, False])
    assert ps.nll_new == pytest.approx(0.5)
    assert ps.p_new == pytest.approx(math.exp(-0.5))
    assert ps.p_true == pytest.approx(0.5)
    assert ps.correct_new is False and ps.correct_true is None
    m = counterfact_metrics([RecordScores(rewrite=[ps], paraphrase=[], neighborhood=[])])
    assert m["efficacy_score"] == 100.0
    assert m["rewrite_accuracy"] == 0.0


def test_nan_raises_with_record_index() -> None:
    bad = RecordScores(rewrite=[PS(0.0, L2)], paraphrase=[], neighborhood=[PS(float("nan"), 0.0)])
    with pytest.raises(ValueError, match=r"record 1: neighborhood\[0\]\.nll_new is NaN"):
        counterfact_metrics([RECORD_A, bad])
    with pytest.raises(ValueError, match="NaN at positions \\[1\\]"):
        mean_nll([-1.0, float("nan")])


def test_empty_inputs_raise() -> None:
    with pytest.raises(ValueError, match="no records"):
        counterfact_metrics([])
    with pytest.raises(ValueError, match="any prompt"):
        counterfact_metrics([RecordScores([], [], [])])
    with pytest.raises(ValueError, match="at least one token"):
        mean_nll([])
    with pytest.raises(ValueError, match="no examples"):
        zsre_token_accuracy([])
    with pytest.raises(ValueError, match="example 1 has no answer tokens"):
        zsre_token_accuracy([[True], []])


def test_partial_correct_flags_in_a_record_raise() -> None:
    record = RecordScores(
        rewrite=[PS(0.0, L2, correct_new=True), PS(0.0, L2)], paraphrase=[], neighborhood=[]
    )
    with pytest.raises(ValueError, match="record 0: only some rewrite prompts"):
        counterfact_metrics([record])


def test_zsre_token_accuracy_averages_per_example() -> None:
    # per example: 1/2 and 1/1 -> (0.5 + 1) / 2 = 75 (pooled tokens would give 2/3)
    assert zsre_token_accuracy([[True, False], [True]]) == pytest.approx(75.0)
    assert zsre_token_accuracy([torch.tensor([True, True, False, False])]) == pytest.approx(50.0)


def test_zsre_metrics_keys_and_values() -> None:
    m = zsre_metrics(
        rewrite_flags=[[True, True], [True, False, False, False]],  # (1 + 0.25) / 2
        paraphrase_flags=[[False], [True]],  # (0 + 1) / 2
        neighborhood_flags=[[True, True, True]],  # 1
    )
    assert m == pytest.approx(
        {"efficacy_accuracy": 62.5, "paraphrase_accuracy": 50.0, "specificity": 100.0}
    )
    assert set(zsre_metrics([[True]], [], [])) == {"efficacy_accuracy"}


def test_locality_agreement() -> None:
    assert locality_agreement([1, 2, 3, 4], [1, 2, 9, 4]) == pytest.approx(0.75)
    assert locality_agreement(torch.tensor([5, 6]), torch.tensor([7, 8])) == 0.0
    with pytest.raises(ValueError, match="pre has 2 tokens but post has 3"):
        locality_agreement([1, 2], [1, 2, 3])


def test_aggregate_mean_per_key_ignoring_missing() -> None:
    out = aggregate([{"a": 1.0, "b": 10.0}, {"a": 3.0}, {"a": 5.0, "c": 7.0}])
    assert out == pytest.approx({"a": 3.0, "b": 10.0, "c": 7.0})
    # weighted by batch size: (1*1 + 3*3) / 4 = 2.5
    assert aggregate([{"a": 1.0}, {"a": 3.0}], weights=[1, 3]) == pytest.approx({"a": 2.5})
    with pytest.raises(ValueError):
        aggregate([])


# --------------------------------------------------------------------------------------------
# generation
# --------------------------------------------------------------------------------------------

H_AB = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))  # {ab: 2, ba: 1} = 0.918 bits


def test_ngram_entropy_hand_computed() -> None:
    assert ngram_entropy("a b a b", 2) == pytest.approx(H_AB)
    assert ngram_entropy("a b a b", 3) == pytest.approx(1.0)  # {aba: 1, bab: 1}
    assert ngram_entropy("a b c d", 1) == pytest.approx(2.0)  # 4 equally likely words
    assert ngram_entropy("x x x x", 2) == 0.0  # one bigram
    assert ngram_entropy("", 2) == 0.0
    assert ngram_entropy("one", 2) == 0.0  # fewer words than n


def test_word_tokens_regex_splits_punctuation_and_keeps_case() -> None:
    assert word_tokens("Paris, paris.") == ["Paris", ",", "paris", "."]
    assert ngram_entropy("Paris, paris.", 1) == pytest.approx(2.0)


def test_generation_entropy_weights() -> None:
    # "a b a b": per text mean(2/3 * H_AB, 4/3 * 1); empty text counts as 0
    per_text = (2 / 3 * H_AB + 4 / 3 * 1.0) / 2
    assert generation_entropy(["a b a b"]) == pytest.approx(per_text)
    assert generation_entropy(["a b a b", ""]) == pytest.approx(per_text / 2)
    assert generation_entropy(["a b a b"], ns=[2], weights=[1.0]) == pytest.approx(H_AB)
    with pytest.raises(ValueError, match="one weight per n"):
        generation_entropy(["a b"], ns=[2, 3], weights=[1.0])
    with pytest.raises(ValueError, match="no texts"):
        generation_entropy([])


def test_repeated_text_has_lower_entropy_than_varied() -> None:
    repeated = "Paris is in France. " * 10
    varied = "The Eiffel Tower, built in 1889, stands on the Champ de Mars in Paris near the Seine."
    assert generation_entropy([repeated]) < generation_entropy([varied])
