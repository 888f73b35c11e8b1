"""Golden numbers: the UNEDITED embedded model's CounterFact metrics on the first 32 records of
counterfact_500.json, as measured by the reference implementation's own evaluation on this model.

A drift here means lmedit's scoring (tokenisation of prompt + target, per-token NLL, the
comparisons, the averaging) no longer reproduces the reference's numbers.
"""

from __future__ import annotations

import pytest

import lmedit
from lmedit.evaluate.runner import evaluate_requests

from helpers import COUNTERFACT_500, needs_data

pytestmark = [pytest.mark.slow, needs_data]

# x100, from the reference implementation's evaluation of the unedited SmolLM2-135M-Instruct
REFERENCE = {"efficacy_score": 31.2, "paraphrase_score": 29.7, "neighborhood_score": 65.9}


def test_unedited_counterfact_metrics_match_the_reference(embedded):
    model, tok = embedded
    requests = lmedit.load_requests(COUNTERFACT_500, limit=32)
    assert len(requests) == 32
    got = evaluate_requests(model, tok, requests, kind="counterfact")
    for key, want in REFERENCE.items():
        assert round(got[key], 1) == pytest.approx(want, abs=0.05), f"{key}: {got[key]:.3f}, reference {want}"
