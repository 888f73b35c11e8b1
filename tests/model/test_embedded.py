"""End-to-end on the embedded real model (SmolLM2-135M-Instruct): a focused set, marked slow.

Statistics use 500 paragraphs of the offline Wikipedia excerpt (about 66k tokens) and the
optimisation runs in bfloat16 to keep the test run short; the benchmark and results use the
preset's full settings.
"""

from __future__ import annotations

import pytest

import lmedit

from helpers import COUNTERFACT_500, assert_same, changed, needs_data, snapshot, teacher_forced_logprobs

pytestmark = pytest.mark.slow
# chat_prompts off: these check the presets on plain prompts (test_chat_form_editing... covers the chat form)
FAST = dict(mom2_n_samples=500, mom2_forward_dtype="bfloat16", compute_dtype="bfloat16", chat_prompts="off")


def test_knows_paris(embedded):
    model, tok = embedded
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert tok.decode(out[0, ids["input_ids"].shape[1]:]).startswith(" Paris")


def _prefers_new(model, tok, requests) -> list[bool]:
    """Per request, the reference's criterion: a lower mean per-token NLL for target_new than for target_true."""
    def mean_logprob(r, target: str) -> float:
        return float(teacher_forced_logprobs(model, tok, r.text, target).mean())

    return [mean_logprob(r, r.target_new) > mean_logprob(r, r.target_true) for r in requests]


@needs_data
@pytest.mark.parametrize("method", ["emmet", "memit", "rome"])
def test_preset_edits_16_counterfact_records(embedded, method):
    model, tok = embedded
    requests = lmedit.load_requests(COUNTERFACT_500, limit=16)
    before = snapshot(model)
    assert sum(_prefers_new(model, tok, requests)) <= 8  # unedited: mostly the true object
    result = lmedit.edit(model, tok, requests, method=method, **FAST)
    try:
        wins = _prefers_new(model, tok, requests)
        assert sum(wins) >= 15, f"{method}: only {sum(wins)}/16 rewrite prompts prefer target_new"
        assert changed(model, before) == {result.adapter.edit_param_name(l) for l in result.layers}
    finally:
        result.undo()
    assert_same(model, before)


@needs_data
def test_chat_form_editing_lands_in_the_chat_template(embedded):
    """The embedded model is an instruct model: by default (chat_prompts="auto") its edits are also
    optimised through its chat template, and the edited facts answer there."""
    from lmedit.evaluate.runner import record_scores

    model, tok = embedded
    requests = lmedit.load_requests(COUNTERFACT_500, limit=8)

    def chat_wins() -> int:
        return sum(rec.rewrite[0].nll_new < rec.rewrite[0].nll_true
                   for rec in record_scores(model, tok, requests, chat=True))

    wins = {}
    for mode in ("auto", "off"):
        result = lmedit.edit(model, tok, requests, method="emmet", **{**FAST, "chat_prompts": mode})
        try:
            wins[mode] = chat_wins()
            if mode == "auto":
                assert len(result.editor.template_groups()) == 2 * len(result.editor.context())
        finally:
            result.undo()
    assert wins["auto"] >= 7 and wins["auto"] >= wins["off"], wins
