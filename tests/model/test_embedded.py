"""End-to-end on the embedded real model (SmolLM2-135M-Instruct): a focused set, marked slow.

Statistics use 500 paragraphs of the offline Wikipedia excerpt (about 66k tokens) and the
optimisation runs in bfloat16 to keep the test run short; the benchmark and results use the
preset's full settings.
"""

from __future__ import annotations

import pytest
import torch

import lmedit
from lmedit.evaluate.scoring import score_continuations

pytestmark = pytest.mark.slow
DATA = "../shared/data/counterfact/counterfact_500.json"
FAST = dict(mom2_n_samples=500, mom2_forward_dtype="bfloat16", compute_dtype="bfloat16")


@pytest.fixture(scope="module")
def embedded():
    model, tok = lmedit.load_model()
    return model, tok


def test_knows_paris(embedded):
    model, tok = embedded
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert tok.decode(out[0, ids["input_ids"].shape[1]:]).startswith(" Paris")


def _prefers_new(model, tok, requests) -> list[bool]:
    prefixes = [r.text for r in requests for _ in (0, 1)]
    conts = [t for r in requests for t in (r.target_new, r.target_true)]
    s = score_continuations(model, tok, prefixes, conts)
    # the reference's criterion: lower mean per-token NLL
    return [float(s[2 * i][0].mean()) > float(s[2 * i + 1][0].mean()) for i in range(len(requests))]


@pytest.mark.parametrize("method", ["emmet", "memit", "rome"])
def test_preset_edits_16_counterfact_records(embedded, method):
    model, tok = embedded
    requests = lmedit.load_requests(DATA, limit=16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert sum(_prefers_new(model, tok, requests)) <= 8  # unedited: mostly the true object
    result = lmedit.edit(model, tok, requests, method=method, **FAST)
    try:
        wins = _prefers_new(model, tok, requests)
        assert sum(wins) >= 15, f"{method}: only {sum(wins)}/16 rewrite prompts prefer target_new"
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert changed == {result.adapter.edit_param_name(l) for l in result.layers}
    finally:
        result.undo()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
