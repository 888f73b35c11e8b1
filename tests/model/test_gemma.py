"""Gemma 3 270M (real weights, when ``make models`` installed its pieces; skipped otherwise, as in
CI): ROME's edits land through the post-MLP norm (v* optimised at the MLP output before it)."""

from __future__ import annotations

import pytest
import torch

import lmedit
from lmedit.errors import ModelLoadError
from lmedit.evaluate.scoring import score_continuations

from helpers import needs_data

pytestmark = pytest.mark.slow

DATA = "../shared/data/counterfact/counterfact_train_10000.json"


@pytest.fixture(scope="module")
def gemma():
    try:
        from lmedit.models.offline import offline_model_dir

        offline_model_dir("gemma-3-270m")
    except ModelLoadError as e:
        pytest.skip(f"Gemma 3 270M is not installed (make models): {e}")
    return lmedit.load_model("gemma-3-270m")


def _mean_lp(model, tok, reqs) -> list[float]:
    """Mean per-token log-prob of each request's target_new after its prompt."""
    return [float(lp.mean()) for lp, _ in score_continuations(model, tok, [r.text for r in reqs],
                                                               [r.target_new for r in reqs])]


@needs_data
def test_rome_edits_land_through_the_post_mlp_norm(gemma):
    model, tok = gemma
    reqs = lmedit.load_requests(DATA)[5000:5004]
    texts, news = [r.text for r in reqs], [r.target_new for r in reqs]
    mean_lp = lambda: _mean_lp(model, tok, reqs)  # noqa: E731
    before = mean_lp()
    res = lmedit.edit(model, tok, reqs, method="rome", layers=[5], chat_prompts="off", mom2_n_samples=200,
                      mom2_forward_dtype="auto", compute_dtype="auto")
    try:
        after = mean_lp()
        assert all(a > max(b + 3.0, -1.0) for a, b in zip(after, before)), (before, after)  # lands, not just moves
        news_p = score_continuations(model, tok, texts, news)
        trues_p = score_continuations(model, tok, texts, [r.target_true for r in reqs])
        assert all(float(n.sum()) > float(t.sum()) for (n, _), (t, _) in zip(news_p, trues_p))
    finally:
        res.undo()
    assert torch.allclose(torch.tensor(mean_lp()), torch.tensor(before), atol=1e-5)


@needs_data
def test_emmet_and_memit_land_with_the_gemma_preset(gemma):
    """The gemma-3-270m preset (one layer, targets at its MLP output, distribution single) is matched
    automatically and its batch edits land, leaving the weights as they were after undo."""
    model, tok = gemma
    reqs = lmedit.load_requests(DATA)[5000:5004]
    mean_lp = lambda: _mean_lp(model, tok, reqs)  # noqa: E731
    before = mean_lp()
    for method in ("emmet", "memit"):
        editor = lmedit.Editor(model, tok, method, mom2_n_samples=200)
        assert editor.preset == "gemma-3-270m" and editor.hparams.site == "mlp"
        res = editor.edit(reqs)
        try:
            after = mean_lp()
            assert all(a > max(b + 3.0, -1.0) for a, b in zip(after, before)), (method, before, after)
        finally:
            res.undo()
        assert torch.allclose(torch.tensor(mean_lp()), torch.tensor(before), atol=1e-5)
