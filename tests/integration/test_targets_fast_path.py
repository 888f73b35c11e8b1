"""The target fast path (KV-cache prefix, truncated blocks) against plain full forward passes on
every tiny architecture, with and without an optimised delta, and its independence of batching.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lmedit.core.keys import residual_stream
from lmedit.core.targets import TargetConfig, compute_targets
from lmedit.core.tokens import encode_subject_prompts
from lmedit.hooks import AddAtPositions, count_hooks
from lmedit.models.adapters import get_adapter

from helpers import VARIED_REQUESTS as REQUESTS
from helpers import continuation_tokens, teacher_forced_logprobs


def _naive_nll(model, tok, request, templates) -> float:
    """mean over templates of the per-token mean NLL of target_new, from full unpadded forwards."""
    target = continuation_tokens(tok, request.text, request.target_new)
    nlls = [-float(teacher_forced_logprobs(model, tok, t.replace("{}", request.text), target).mean()) for t in templates]
    return sum(nlls) / len(nlls)


TEMPLATES = ["{}", "Some context. {}"]


@pytest.mark.parametrize("layer", [1, 3])
def test_target_loss_fast_path_matches_full_forwards(tiny_model, layer):
    model, tok = tiny_model
    adapter = get_adapter(model)
    res = compute_targets(model, tok, adapter, REQUESTS, TEMPLATES, layer, TargetConfig(v_num_grad_steps=1))
    assert count_hooks(model) == 0
    assert len(adapter.block_list(model)) == 4  # the truncated block list was put back
    assert torch.equal(res.delta, torch.zeros_like(res.delta))
    naive = torch.tensor([_naive_nll(model, tok, r, TEMPLATES) for r in REQUESTS], dtype=torch.float32)
    torch.testing.assert_close(res.loss, naive, rtol=1e-4, atol=1e-4)  # at step 0 the loss is the NLL
    torch.testing.assert_close(res.target_prob, torch.exp(-naive), rtol=1e-4, atol=1e-7)
    # z = block output at the subject's last token of the bare prompt
    z = residual_stream(model, tok, adapter, REQUESTS, layer)
    torch.testing.assert_close(res.init, z, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(res.targets, z, rtol=1e-4, atol=1e-5)


def test_target_fast_path_matches_full_forwards_with_a_delta(make_tiny, tokenizer):
    """After optimisation, the returned delta added at the subject token in a plain forward
    gives the probability compute_targets reports (the last step only evaluates)."""
    model = make_tiny("llama")
    adapter = get_adapter(model)
    hp = TargetConfig(v_num_grad_steps=4, v_lr=0.5, clamp_norm_factor=4.0, kl_factor=0.0, v_weight_decay=0.0,
                      early_stop_loss=0.0)
    res = compute_targets(model, tokenizer, adapter, REQUESTS, TEMPLATES, 1, hp)
    assert (res.delta.norm(dim=1) > 0).all()
    for i, r in enumerate(REQUESTS):
        target = continuation_tokens(tokenizer, r.text, r.target_new)
        nlls = []
        for t in TEMPLATES:
            seq, = encode_subject_prompts(tokenizer, [t.replace("{}", r.prompt)], [r.subject])
            with AddAtPositions(adapter.block(model, 1), res.delta[i:i + 1], torch.tensor([seq.subject_last])):
                nlls.append(-float(teacher_forced_logprobs(model, tokenizer, seq.ids, target).mean()))
        torch.testing.assert_close(float(res.target_prob[i]), float(torch.exp(-torch.tensor(sum(nlls) / 2))),
                                   rtol=1e-4, atol=1e-6)


def test_targets_do_not_depend_on_batching(tiny_model):
    model, tok = tiny_model
    adapter = get_adapter(model)
    hp = TargetConfig(v_num_grad_steps=5, v_lr=0.2, clamp_norm_factor=4.0, early_stop_loss=0.0)
    together = compute_targets(model, tok, adapter, REQUESTS, TEMPLATES, 2, hp)
    assert (together.steps == 5).all()
    for i, r in enumerate(REQUESTS):
        alone = compute_targets(model, tok, adapter, [r], TEMPLATES, 2, hp)
        scale = float(together.delta[i].norm())
        assert scale > 0
        # padding changes float rounding (~1e-7); Adam divides by sqrt(v) + 1e-8, so a gradient component
        # near 1e-6 amplifies that to ~1e-3 after a few steps (seen on qwen2): hence 1e-2, not 1e-6.
        # A real leak between requests (padding or another request's delta) moves delta by O(1).
        assert float((alone.delta[0] - together.delta[i]).norm()) < 1e-2 * scale
        torch.testing.assert_close(alone.targets[0], together.targets[i], rtol=1e-2, atol=1e-2 * scale)
        torch.testing.assert_close(alone.loss[0], together.loss[i], rtol=1e-2, atol=1e-3)
    # chunking is batching too
    chunked = compute_targets(model, tok, adapter, REQUESTS, TEMPLATES, 2, dataclasses.replace(hp, chunk_requests=2))
    torch.testing.assert_close(chunked.targets, together.targets, rtol=1e-2, atol=1e-2)


def test_bucket_merging_is_optimal_and_keeps_big_groups_apart():
    import itertools
    import random

    from lmedit.core.layout import _merged

    def cost(runs, widths, rows, k):
        return sum(sum(rows[a:b + 1]) * widths[b] + k for a, b in runs)

    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 6)
        widths = sorted(rng.sample([1, 2, 4, 8, 16, 32, 64], n))
        rows = [rng.randint(1, 40) for _ in widths]
        k = rng.choice([0, 8, 32, 100])
        runs = _merged(widths, rows, k)
        assert [a for a, _ in runs] == [0] + [b + 1 for _, b in runs[:-1]] and runs[-1][1] == n - 1  # a partition
        brute = min(cost([(a, b - 1) for a, b in zip((0,) + cuts, cuts + (n,))], widths, rows, k)
                    for m in range(n) for cuts in itertools.combinations(range(1, n), m))
        assert cost(runs, widths, rows, k) == brute
    # one request: its lone KL row (width 1) joins the next bucket; 64 requests: every width its own pass
    assert _merged([1, 4, 16], [1, 6, 6], 32) == [(0, 1), (2, 2)]
    assert _merged([1, 4, 16], [64, 384, 384], 32) == [(0, 0), (1, 1), (2, 2)]
    assert _merged([1, 4, 16], [64, 384, 384], 0) == [(0, 0), (1, 1), (2, 2)]


def test_targets_do_not_depend_on_bucket_merging(tiny_model, monkeypatch):
    """Every sequence in one pass (no buckets) and each width in its own pass give the same optimisation."""
    from lmedit.core import layout, targets

    model, tok = tiny_model
    adapter = get_adapter(model)
    hp = TargetConfig(v_num_grad_steps=4, v_lr=0.2, clamp_norm_factor=4.0, early_stop_loss=0.0)
    runs = {}
    for name, k in (("apart", 0), ("merged", 10 ** 9)):
        monkeypatch.setattr(targets, "buckets", lambda lay, k=k, device=None, among=None: layout.buckets(lay, pass_tokens=k, among=among))
        seen = []
        orig = targets._Resumed.__init__

        def init(self, *a, orig=orig, seen=seen):
            orig(self, *a)
            seen.append(len(self.buckets))

        monkeypatch.setattr(targets._Resumed, "__init__", init)
        runs[name] = compute_targets(model, tok, adapter, REQUESTS, TEMPLATES, 2, hp)
        runs[name + "_buckets"] = seen[0]
    assert runs["merged_buckets"] == 1 < runs["apart_buckets"]
    scale = float(runs["apart"].delta.norm())
    assert float((runs["merged"].delta - runs["apart"].delta).norm()) < 1e-2 * scale  # padding rounding only
    torch.testing.assert_close(runs["merged"].loss, runs["apart"].loss, rtol=1e-2, atol=1e-3)


def test_the_pass_layout_follows_the_device(tokenizer):
    """A CPU pass costs 32 tokens beyond its rows, so many rows keep their widths apart; on CUDA every
    width goes into one pass a step; device types not measured are costed as a CPU."""
    from lmedit.core.layout import PASS_TOKENS, build_layout, buckets, pass_cost

    assert pass_cost("cpu") == pass_cost(None) == pass_cost("xpu") == PASS_TOKENS["cpu"] == 32
    assert pass_cost("cuda") == pass_cost(torch.device("cuda", 0)) == PASS_TOKENS["cuda"] == 100_000
    lay = build_layout(tokenizer, REQUESTS * 20, TEMPLATES)
    on_cpu, on_gpu = buckets(lay, device="cpu"), buckets(lay, device="cuda")
    assert len(on_cpu) > 1 and len(on_gpu) == 1
    assert sorted(torch.cat([b.seqs for b in on_cpu]).tolist()) == on_gpu[0].seqs.tolist() == list(range(lay.ids.shape[0]))
    assert len(buckets(lay)) == len(on_cpu)  # no device given: a CPU's


def test_the_requests_left_are_laid_out_alone(tokenizer):
    """Once requests stop, the rest get the passes they would get alone: one request left of 60 pays
    for its own widths and merging, not for the buckets laid out for all 60."""
    from lmedit.core.layout import build_layout, buckets

    many = REQUESTS * 20
    lay = build_layout(tokenizer, many, TEMPLATES)
    for i in (0, len(REQUESTS) - 1):
        among = lay.req == i  # request i (and its KL row) still active
        alone = buckets(build_layout(tokenizer, [many[i]], TEMPLATES))
        left = buckets(lay, among=among)
        assert [b.width for b in left] == [b.width for b in alone]
        assert sorted(torch.cat([b.seqs for b in left]).tolist()) == torch.nonzero(among).squeeze(1).tolist()
        entries = torch.cat([b.entries for b in left])
        assert bool(among[lay.loss_rows[entries]].all()) and len(entries) == int(among[lay.loss_rows].sum())
    assert len(buckets(lay)) > len(buckets(lay, among=lay.req == 0))


def test_a_step_of_the_requests_left_runs_only_their_passes(tiny_model):
    """When only the request with the narrowest loss is left, its step runs its own passes (fewer
    tokens than the buckets laid out for every request) and gives the same loss and argmax check."""
    from lmedit.core import targets
    from lmedit.core.layout import Bucket, build_layout, buckets

    model, tok = tiny_model
    adapter = get_adapter(model)
    lay = build_layout(tok, REQUESTS, TEMPLATES)
    reach = torch.zeros(len(REQUESTS), dtype=torch.long)  # the farthest loss column of each request
    reach.scatter_reduce_(0, lay.req[lay.loss_rows], lay.loss_cols - lay.S + 1, reduce="amax")
    narrow = int(reach.argmin())
    assert int(reach[narrow]) < int(reach.max())  # otherwise its own passes would be as wide
    with targets.frozen(model):
        pre = targets._prefix_pass(model, adapter, lay, 2, "block")
        active = torch.zeros(len(REQUESTS), dtype=torch.bool)
        active[narrow] = True
        act = torch.tensor([narrow])
        delta = torch.randn(1, pre.init.shape[1]) * 0.1
        steps = {}
        for name in ("laid out anew", "laid out for all"):
            run = targets._Resumed(model, adapter, lay, pre, 2)
            if name == "laid out for all":  # as before: the buckets of every request, their active rows
                keep = active[lay.req]
                run.buckets = [Bucket(bk.width, bk.seqs[keep[bk.seqs]], bk.entries[keep[lay.loss_rows[bk.entries]]])
                               for bk in buckets(lay) if bool(keep[bk.seqs].any())]
                run._laid_out = keep
            steps[name] = (run.step(delta, act, active), run.tokens)
    (new, new_tokens), (old, old_tokens) = steps["laid out anew"], steps["laid out for all"]
    assert new_tokens < old_tokens
    torch.testing.assert_close(new.nll, old.nll, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(new.kl_logp, old.kl_logp, rtol=1e-4, atol=1e-4)
    assert torch.equal(new.argmax_ok, old.argmax_ok)


def test_passes_after_the_last_block_run_where_the_head_is(make_tiny):
    """After the last block the passes resume at the final norm; where it has no weights (OLMo's
    tiny config), its device is the head's."""
    from lmedit.core.targets import passes_device, resume_module

    model = make_tiny("olmo")
    adapter = get_adapter(model)
    last = adapter.n_layers(model) - 1
    assert resume_module(model, adapter, last) is adapter.final_norm_module(model)
    assert passes_device(model, adapter, last).type == "cpu"
    assert resume_module(model, adapter, 0) is adapter.block(model, 1)
