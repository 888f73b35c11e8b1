"""Evaluation against hand computations: teacher-forced scores against plain full forward passes,
CounterFact and zsRE metrics against the formulas applied in the test to those scores.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import pytest
import torch

import lmedit
from lmedit import EditRequest
from lmedit.evaluate.runner import evaluate_requests, record_scores
from lmedit.evaluate.scoring import score_continuations

from helpers import COUNTERFACT_500, ZSRE_EVAL, continuation_tokens, needs_data, teacher_forced_logprobs

# prefixes of different token lengths, continuations of one and several tokens
PAIRS = [
    ("The capital of France is", "Paris"),
    ("Danielle Darrieux's mother tongue is", "French"),
    ("A", "very long continuation with several words in it"),
    ("The Eiffel Tower, which was built for the 1889 World's Fair, is located in the city of", "Paris, France"),
    ("Lionel Messi plays", "the piano keyboard"),
    ("Hi", "!"),
]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def tiny(request, make_tiny, tokenizer):
    return make_tiny(request.param, seed=2), tokenizer


def _by_hand(model, tok, prefix: str, cont: str) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Continuation tokens, their log-probs and argmax flags from ONE unpadded full forward."""
    lp, is_argmax = teacher_forced_logprobs(model, tok, prefix, cont, with_argmax=True)
    return continuation_tokens(tok, prefix, cont), lp.float(), is_argmax


@pytest.mark.parametrize("max_tokens", [8192, 40])  # one padded batch, or many small ones
def test_score_continuations_equals_full_forward(tiny, max_tokens):
    model, tok = tiny
    scored = score_continuations(model, tok, [p for p, _ in PAIRS], [c for _, c in PAIRS], max_tokens=max_tokens)
    assert len(scored) == len(PAIRS)
    n_multi = 0
    for (prefix, cont), (lp, ok) in zip(PAIRS, scored):
        c, lp_hand, ok_hand = _by_hand(model, tok, prefix, cont)
        assert lp.shape == (len(c),) and ok.dtype == torch.bool and ok.shape == (len(c),)
        torch.testing.assert_close(lp, lp_hand, rtol=0, atol=1e-5)
        assert torch.equal(ok, ok_hand)
        n_multi += len(c) > 1
    assert n_multi >= 3


def test_score_continuations_batching_does_not_change_results(tiny):
    """Each pair alone (no padding) == all pairs in one right-padded batch; order is kept."""
    model, tok = tiny
    together = score_continuations(model, tok, [p for p, _ in PAIRS], [c for _, c in PAIRS])
    for (prefix, cont), (lp, ok) in zip(PAIRS, together):
        [(lp1, ok1)] = score_continuations(model, tok, [prefix], [cont])
        torch.testing.assert_close(lp, lp1, rtol=0, atol=1e-5)
        assert torch.equal(ok, ok1)


def test_argmax_flags_are_true_for_the_greedy_continuation(tiny):
    """Continue each prefix greedily by 3 tokens; scoring that text flags every token correct."""
    model, tok = tiny
    checked = 0
    for prefix, _ in PAIRS:
        ids = tok(prefix)["input_ids"]
        with torch.no_grad():
            for _ in range(3):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        cont = tok.decode(ids[len(tok(prefix)["input_ids"]):])
        if not cont.startswith(" ") or cont != " " + cont.strip():
            continue  # " " + cont.strip() would not be the greedy tokens
        [(lp, ok)] = score_continuations(model, tok, [prefix], [cont.strip()])
        c, _, _ = _by_hand(model, tok, prefix, cont.strip())
        if c != ids[len(tok(prefix)["input_ids"]):]:
            continue  # re-tokenising the decoded text gave other tokens
        assert ok.all(), (prefix, cont)
        checked += 1
    assert checked >= 1


# --- CounterFact ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cf_requests():
    reqs = lmedit.load_requests(COUNTERFACT_500, limit=2)
    # keep 3 neighbourhood and 2 generation prompts per record: enough to average, quick to run
    return [EditRequest(**{**r.to_dict(), "neighborhood_prompts": r.neighborhood_prompts[:3],
                           "generation_prompts": r.generation_prompts[:2]}) for r in reqs]


def _harmonic_mean3(a: float, b: float, c: float) -> float:
    """3 / (1/a + 1/b + 1/c), and 0 when any of them is 0 (written out, not lmedit's harmonic_mean)."""
    return 0.0 if 0.0 in (a, b, c) else 3.0 / (1.0 / a + 1.0 / b + 1.0 / c)


def _counterfact_by_hand(model, tok, reqs) -> dict[str, float]:
    """ES/PS/NS and magnitudes (x100) from score_continuations, per record then across records."""
    def nll(prompt, target):
        [(lp, _)] = score_continuations(model, tok, [prompt], [target])
        return -float(lp.double().mean())

    groups = {"efficacy": [], "paraphrase": [], "neighborhood": []}
    for r in reqs:
        for name, prompts in (("efficacy", [r.text]), ("paraphrase", r.paraphrase_prompts),
                              ("neighborhood", r.neighborhood_prompts)):
            s, m = [], []
            for p in prompts:
                new, true = nll(p, r.target_new), nll(p, r.target_true)
                if name == "neighborhood":
                    s.append(true < new)
                    m.append(math.exp(-true) - math.exp(-new))
                else:
                    s.append(new < true)
                    m.append(math.exp(-new) - math.exp(-true))
            groups[name].append((sum(s) / len(s), sum(m) / len(m)))
    out = {}
    for name, per_record in groups.items():
        out[f"{name}_score"] = 100 * sum(s for s, _ in per_record) / len(per_record)
        out[f"{name}_magnitude"] = 100 * sum(m for _, m in per_record) / len(per_record)
    out["score"] = _harmonic_mean3(out["efficacy_score"], out["paraphrase_score"], out["neighborhood_score"])
    return out


@needs_data
def test_record_scores_by_hand(tiny, cf_requests):
    model, tok = tiny
    recs = record_scores(model, tok, cf_requests)
    assert len(recs) == 2
    for r, rec in zip(cf_requests, recs):
        assert (len(rec.rewrite), len(rec.paraphrase), len(rec.neighborhood)) == \
            (1, len(r.paraphrase_prompts), len(r.neighborhood_prompts))
        for prompt, ps in zip(r.paraphrase_prompts, rec.paraphrase):
            (lp_new, ok_new), (lp_true, _) = score_continuations(model, tok, [prompt, prompt], [r.target_new, r.target_true])
            assert ps.nll_new == pytest.approx(-float(lp_new.double().mean()), abs=1e-5)
            assert ps.nll_true == pytest.approx(-float(lp_true.double().mean()), abs=1e-5)
            assert ps.correct_new == bool(ok_new.all())


@needs_data
def test_evaluate_requests_counterfact_by_hand(tiny, cf_requests):
    model, tok = tiny
    got = evaluate_requests(model, tok, cf_requests)
    want = _counterfact_by_hand(model, tok, cf_requests)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-4), k  # abs: per-pair scores differ by <1e-5 from batching
    assert "generation_entropy" not in got


@needs_data
def test_evaluate_requests_counterfact_after_an_edit(tiny, cf_requests, covariances):
    """The same hand computation on an edited model (whose scores have moved)."""
    model, tok = tiny
    pre = [rec.rewrite[0].nll_new for rec in record_scores(model, tok, cf_requests)]
    res = lmedit.edit(model, tok, cf_requests, method="emmet", layers=[1, 2], covariances=covariances(model, [1, 2]),
                      v_num_grad_steps=10, context_templates=[[5, 1]])
    try:
        got = evaluate_requests(model, tok, cf_requests)
        want = _counterfact_by_hand(model, tok, cf_requests)
        post = [rec.rewrite[0].nll_new for rec in record_scores(model, tok, cf_requests)]
    finally:
        res.undo()
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-4), k
    # the model really is another one: each rewrite's target_new NLL fell by more than a nat
    assert all(b < a - 1.0 for a, b in zip(pre, post)), (pre, post)


def _greedy_text(model, tok, prompt: str, n_tokens: int) -> str:
    """``n_tokens`` greedy tokens after ``prompt`` by plain unpadded forwards (no generate()), decoded."""
    ids = tok(prompt)["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(n_tokens):
            new.append(int(model(torch.tensor([ids + new])).logits[0, -1].argmax()))
    return tok.decode(new, skip_special_tokens=True)


def _entropy_by_hand(texts: list[str]) -> float:
    """The reference's n-gram entropy, re-implemented here: per text the mean of (2/3) H_2 and (4/3) H_3,
    H_n the entropy (bits) of the text's word n-grams; then the mean over texts."""
    def h(words: list[str], n: int) -> float:
        grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        return -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0

    per_text = []
    for t in texts:
        words = re.findall(r"\w+|[^\w\s]", t)
        per_text.append((2 / 3 * h(words, 2) + 4 / 3 * h(words, 3)) / 2)
    return sum(per_text) / len(per_text)


def test_entropy_by_hand_on_a_hand_made_text():
    # "a b a b": bigrams ab, ba, ab -> H_2 = -(2/3 log2 2/3 + 1/3 log2 1/3) = 0.918296;
    # trigrams aba, bab -> H_3 = 1; (2/3 * 0.918296 + 4/3 * 1) / 2 = 0.972766
    assert _entropy_by_hand(["a b a b"]) == pytest.approx((2 / 3 * 0.9182958340544896 + 4 / 3) / 2, abs=1e-12)
    assert _entropy_by_hand(["a b a b", "x"]) == pytest.approx(0.9727652780181632 / 2, abs=1e-12)  # "x": no n-grams


@needs_data
def test_generation_entropy_key(tiny, cf_requests):
    """The key against greedy texts generated by hand and the entropy re-implemented above."""
    model, tok = tiny
    got = evaluate_requests(model, tok, cf_requests, generation=True, generation_tokens=5)
    prompts = [p for r in cf_requests for p in r.generation_prompts]
    assert len(prompts) == 4
    texts = [_greedy_text(model, tok, p, 5) for p in prompts]
    want = _entropy_by_hand(texts)
    assert want > 0.1, texts  # not the trivial 0 of texts without distinct n-grams
    assert got["generation_entropy"] == pytest.approx(want, abs=1e-9)


# --- zsRE -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def zsre_requests():
    """The first two records of the MEND zsRE evaluation set."""
    return lmedit.load_requests(ZSRE_EVAL, limit=2)


def _zsre_by_hand(model, tok, reqs) -> dict[str, float]:
    def acc(pairs):
        per = []
        for prompt, target in pairs:
            [(_, ok)] = score_continuations(model, tok, [prompt], [target])
            per.append(float(ok.double().mean()))
        return 100 * sum(per) / len(per)

    return {"efficacy_accuracy": acc([(r.text, r.target_new) for r in reqs]),
            "paraphrase_accuracy": acc([(p, r.target_new) for r in reqs for p in r.paraphrase_prompts]),
            "specificity": acc([(p, r.neighborhood_target) for r in reqs for p in r.neighborhood_prompts])}


def _greedy_word(model, tok, prompt: str) -> str | None:
    """The word w such that " " + w is exactly the model's argmax token after ``prompt``, or None."""
    ids = tok(prompt)["input_ids"]
    with torch.no_grad():
        first = int(model(torch.tensor([ids])).logits[0, -1].argmax())
    text = tok.decode([first])
    if text.startswith(" ") and text.strip() and tok(prompt + text)["input_ids"] == ids + [first]:
        return text.strip()
    return None


@needs_data
def test_evaluate_requests_zsre_by_hand(tiny, zsre_requests):
    """On a random model every zsRE flag is False; so the second record's new answer and loc answer
    are replaced by the model's own greedy word (its loc prompt by its edit prompt), making efficacy
    and specificity 50, not 0."""
    model, tok = tiny
    reqs = list(zsre_requests)
    word = _greedy_word(model, tok, reqs[1].text)
    assert word is not None
    reqs[1] = EditRequest(**{**reqs[1].to_dict(), "target_new": word, "target_true": None,
                             "neighborhood_prompts": [reqs[1].text], "neighborhood_answer": word})
    got = evaluate_requests(model, tok, reqs, kind="zsre")
    assert {"efficacy_accuracy", "paraphrase_accuracy", "specificity"} <= set(got)
    want = _zsre_by_hand(model, tok, reqs)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-9), k
    assert got["efficacy_accuracy"] >= 50.0 and got["specificity"] >= 50.0  # record 1 scores 100 on both
    assert "generation_entropy" not in evaluate_requests(model, tok, reqs, kind="zsre", generation=True,
                                                         generation_tokens=5)  # zsRE has no generation prompts


@needs_data
def test_evaluate_requests_rejects_bad_kind_and_missing_true(tiny, cf_requests):
    model, tok = tiny
    with pytest.raises(ValueError, match="kind must be 'counterfact' or 'zsre', got 'mquake'"):
        evaluate_requests(model, tok, cf_requests, kind="mquake")
    no_true = EditRequest("The capital of {} is", "Xanadu", "Paris")
    with pytest.raises(ValueError, match="CounterFact metrics need target_true"):
        evaluate_requests(model, tok, [no_true])


@needs_data
def test_easyedit_metrics_by_hand(tiny, cf_requests, covariances):
    """rewrite_acc / rephrase_acc: mean share of target_new tokens that are the argmax; locality:
    share of neighbourhood answer positions whose argmax did not change with the edit."""
    from lmedit.evaluate.runner import EasyEditMetrics

    model, tok = tiny
    reqs = cf_requests[:3]

    def argmax_tokens(prompt, answer):
        ids = continuation_tokens(tok, prompt, answer)
        p = tok(prompt)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([p + ids])).logits[0]
        return logits[len(p) - 1:len(p) + len(ids) - 1].argmax(-1).tolist()

    before = {id(r): [argmax_tokens(p, r.neighborhood_target) for p in r.neighborhood_prompts] for r in reqs}
    ee = EasyEditMetrics(model, tok, reqs)
    assert ee(model, tok, reqs)["locality"] == pytest.approx(100.0)
    res = lmedit.edit(model, tok, reqs, method="emmet", layers=[1, 2], covariances=covariances(model, [1, 2]),
                      v_num_grad_steps=10, context_templates=[[5, 1]], chat_prompts="off")
    try:
        got = ee(model, tok, reqs)
        acc = {"rewrite": [], "rephrase": []}
        loc = []
        for r in reqs:
            for kind, prompts in (("rewrite", [r.text]), ("rephrase", r.paraphrase_prompts)):
                acc[kind].append(sum(float(_by_hand(model, tok, p, r.target_new)[2].float().mean())
                                     for p in prompts) / len(prompts))
            now = [argmax_tokens(p, r.neighborhood_target) for p in r.neighborhood_prompts]
            loc.append(sum(sum(a == b for a, b in zip(x, y)) / len(x) for x, y in zip(before[id(r)], now)) / len(now))
    finally:
        res.undo()
    assert got["rewrite_acc"] == pytest.approx(100 * sum(acc["rewrite"]) / len(reqs), abs=1e-6)
    assert got["rephrase_acc"] == pytest.approx(100 * sum(acc["rephrase"]) / len(reqs), abs=1e-6)
    assert got["locality"] == pytest.approx(100 * sum(loc) / len(reqs), abs=1e-6)
