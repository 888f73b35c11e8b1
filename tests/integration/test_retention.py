"""Retention metrics against plain, unbatched computations on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch

import lmedit
from helpers import teacher_forced_logprobs
from lmedit.evaluate.retention import RetentionProbe, answer_scores, answered, perplexity, relative_change

TEXTS = ["The cat sat on the mat and looked out of the window.", "Paris is the capital of France.",
         "A very short one."]


def test_perplexity_equals_a_plain_per_text_computation(fresh, tokenizer):
    model = fresh("llama")
    nll, n = 0.0, 0
    for text in TEXTS:  # one unpadded forward per text, no lmedit code
        ids = tokenizer(text)["input_ids"]
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].double(), -1)
        nll -= float(lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum())
        n += len(ids) - 1
    assert perplexity(model, tokenizer, TEXTS, max_tokens=40) == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_answered_is_the_argmax_of_every_answer_token(fresh, tokenizer):
    model = fresh("gpt2")
    prompts = ["The capital of France is", "My favourite colour is", "One two three"]
    # the model's own greedy continuations are answered; a random word is not
    answers = []
    for p in prompts[:2]:
        ids = tokenizer(p)["input_ids"]
        with torch.no_grad():
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        answers.append(tokenizer.decode([nxt]).strip() or "x")
    answers.append("zebra")
    got = answered(model, tokenizer, prompts, answers)
    plain = [teacher_forced_logprobs(model, tokenizer, p, a, with_argmax=True) for p, a in zip(prompts, answers)]
    want = [bool(flags.all()) for _, flags in plain]
    assert got == want and not got[2]
    ok, logp = answer_scores(model, tokenizer, prompts, answers)
    assert ok == want and logp == pytest.approx([float(lp.double().mean()) for lp, _ in plain], abs=1e-5)


def test_probe_keeps_the_known_facts_and_relative_change(fresh, tokenizer):
    model = fresh("llama")
    adapter = lmedit.get_adapter(model)
    probe = RetentionProbe.build(model, tokenizer, ["One two three", "The capital of France is"], ["zebra", "zebra"],
                                 TEXTS, ["Once upon a time"], fluency_tokens=5)
    assert probe.known_prompts == []  # a random model answers neither
    m = probe.measure(model, tokenizer)
    assert m["known_facts"] == 0 and m["perplexity"] == perplexity(model, tokenizer, TEXTS)
    W0 = {1: adapter.weight(model, 1).detach().double().clone()}
    with torch.no_grad():
        adapter.weight(model, 1).mul_(1.5)
    assert relative_change(model, adapter, W0)[1] == pytest.approx(0.5, rel=1e-6)


def test_known_facts_whose_subject_was_edited_are_set_apart(fresh, tokenizer):
    model = fresh("llama")
    prompts = ["The capital of France is", "My favourite colour is", "One two three"]
    with torch.no_grad():  # the model's own greedy next tokens: answered
        answers = [tokenizer.decode([int(model(torch.tensor([tokenizer(p)["input_ids"]])).logits[0, -1].argmax())])
                   .strip() or "x" for p in prompts]
    subjects = ["France", "colour", "One"]
    probe = RetentionProbe.build(model, tokenizer, prompts, answers, TEXTS, ["Once upon a time"],
                                 fluency_tokens=5, known_subjects=subjects)
    kept = probe.known_subjects
    assert kept and len(kept) == len(probe.known_prompts) and set(kept) <= set(subjects)
    probe.known_answers[0] = "zebra"  # the first fact is now lost: its subject edited or not decides the share
    m = probe.measure(model, tokenizer)
    n = len(kept)
    assert m["known_ok"][0] is False and m["known_retention"] == pytest.approx(100.0 * (n - 1) / n)
    _, logp = answer_scores(model, tokenizer, probe.known_prompts, probe.known_answers)
    assert m["known_logprob"] == pytest.approx(sum(logp) / n)
    assert m["known_retention_others"] == m["known_retention"] and m["known_others"] == n
    m = probe.measure(model, tokenizer, edited_subjects=[kept[0].upper()])  # case-insensitive
    assert m["known_others"] == n - 1 and m["known_retention_others"] == 100.0
    assert m["known_retention"] == pytest.approx(100.0 * (n - 1) / n)
    with pytest.raises(ValueError, match="subjects"):
        RetentionProbe(["a", "b"], ["x", "y"], TEXTS, [], known_subjects=["a"])
