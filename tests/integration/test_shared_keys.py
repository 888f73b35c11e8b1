"""Requests that share a key (the same tokens up to the subject's last one) get one target vector,
optimised for all of their facts (``share_key_targets``), on a tiny Llama."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import lmedit
from lmedit.core.keys import collect_keys
from lmedit.core.targets import TargetConfig, compute_targets, key_order, plan_chunks, shared_key_groups, shared_keys
from lmedit.core.tokens import encode_subject_prompts
from lmedit.errors import HyperparameterError, RequestError
from lmedit.hooks import AddAtPositions
from lmedit.models.adapters import get_adapter

from helpers import assert_same, continuation_tokens, edit_kwargs, snapshot, teacher_forced_logprobs

PLAYS = lmedit.EditRequest("{} plays the", "Lionel Messi", "piano")
BORN = lmedit.EditRequest("{} was born in", "Lionel Messi", "Paris")
OTHER = lmedit.EditRequest("The capital of {} is", "Xanadu", "Rome")
TEMPLATES = ["{}", "Some context. {}"]


def test_requests_share_a_key_when_they_read_the_same_tokens_up_to_the_subject(make_tiny, tokenizer):
    reqs = [PLAYS, BORN, lmedit.EditRequest("The sport of {} is", "Lionel Messi", "chess"),
            lmedit.EditRequest("{} plays the", "Leo Messi", "drums"), dataclasses.replace(PLAYS, target_new="violin"),
            OTHER]
    assert shared_key_groups(tokenizer, reqs) == [0, 0, 1, 2, 0, 3]
    assert shared_keys(tokenizer, reqs) == [[0, 1, 4]]
    assert key_order(tokenizer, reqs, True) == ([0, 1, 4, 2, 3, 5], [0, 0, 0, 1, 2, 3])
    assert key_order(tokenizer, reqs, False) == (list(range(6)), list(range(6)))
    assert shared_keys(tokenizer, [PLAYS, OTHER]) == [] and shared_key_groups(tokenizer, []) == []
    # what the grouping stands for: the keys an edit reads (with context templates) are the same
    model = make_tiny("llama")
    keys = collect_keys(model, tokenizer, get_adapter(model), reqs, [TEMPLATES], [1])[1]
    assert torch.equal(keys[0], keys[1]) and torch.equal(keys[0], keys[4])
    assert not torch.equal(keys[0], keys[2]) and not torch.equal(keys[0], keys[3])


def _nll(model, tok, adapter, layer, request, delta) -> float:
    """Mean over TEMPLATES of the target's per-token NLL with ``delta`` added at the subject's last token."""
    target = continuation_tokens(tok, request.text, request.target_new)
    out = []
    for t in TEMPLATES:
        seq, = encode_subject_prompts(tok, [t.replace("{}", request.prompt)], [request.subject])
        with AddAtPositions(adapter.block(model, layer), delta[None], torch.tensor([seq.subject_last])):
            out.append(-float(teacher_forced_logprobs(model, tok, seq.ids, target).mean()))
    return sum(out) / len(out)


def test_requests_sharing_a_key_get_one_vector_that_serves_all_of_them(make_tiny, tokenizer):
    model = make_tiny("llama")
    adapter = get_adapter(model)
    reqs = [PLAYS, OTHER, BORN]
    hp = TargetConfig(v_num_grad_steps=8, v_lr=0.5, clamp_norm_factor=4.0, early_stop_loss=0.0)
    joint = compute_targets(model, tokenizer, adapter, reqs, TEMPLATES, 1, hp)
    own = compute_targets(model, tokenizer, adapter, reqs, TEMPLATES, 1, dataclasses.replace(hp, share_key_targets=False))
    assert torch.equal(joint.delta[0], joint.delta[2]) and torch.equal(joint.targets[0], joint.targets[2])
    assert not torch.equal(own.delta[0], own.delta[2])
    assert int(joint.steps[0]) == int(joint.steps[2]) == 16  # the steps of both facts alone
    assert int(joint.steps[1]) == 8 and (own.steps == 8).all()
    # the request of its own key is optimised as without the option (up to padding rounding: it sat in another order)
    scale = float(own.delta[1].norm())
    assert float((joint.delta[1] - own.delta[1]).norm()) < 1e-2 * scale
    # each member's loss is its own: the target probability reported is that of its own fact
    for i in (0, 2):
        nll = _nll(model, tokenizer, adapter, 1, reqs[i], joint.delta[i])
        torch.testing.assert_close(float(joint.target_prob[i]), float(torch.exp(torch.tensor(-nll))), rtol=1e-4, atol=1e-6)
    # one vector for both facts serves them better than the mean of their own vectors (what an edit of
    # one key with two targets writes), and each own vector serves the other fact worse than the joint one
    mean_own = (own.delta[0] + own.delta[2]) / 2
    both = [_nll(model, tokenizer, adapter, 1, reqs[i], joint.delta[0]) for i in (0, 2)]
    averaged = [_nll(model, tokenizer, adapter, 1, reqs[i], mean_own) for i in (0, 2)]
    assert sum(both) < sum(averaged)
    assert both[1] < _nll(model, tokenizer, adapter, 1, BORN, own.delta[0])
    assert both[0] < _nll(model, tokenizer, adapter, 1, PLAYS, own.delta[2])


def test_chunks_in_key_order_give_the_vectors_of_one_chunk(make_tiny, tokenizer):
    """Requests sharing a key are optimised in one chunk wherever they stand; the results come back in
    the requests' order."""
    model = make_tiny("llama")
    adapter = get_adapter(model)
    reqs = [PLAYS, OTHER, BORN]
    hp = TargetConfig(v_num_grad_steps=5, v_lr=0.5, clamp_norm_factor=4.0, early_stop_loss=0.0)
    one = compute_targets(model, tokenizer, adapter, reqs, TEMPLATES, 1, hp)
    split = compute_targets(model, tokenizer, adapter, reqs, TEMPLATES, 1, dataclasses.replace(hp, chunk_requests=1))
    assert torch.equal(split.delta[0], split.delta[2]) and split.steps.tolist() == [10, 5, 10]
    scale = float(one.delta.norm())
    assert float((split.delta - one.delta).norm()) < 1e-2 * scale  # padding rounding only
    alone = compute_targets(model, tokenizer, adapter, [OTHER], TEMPLATES, 1, hp)
    assert float((split.delta[1] - alone.delta[0]).norm()) < 1e-2 * float(alone.delta.norm())


def test_a_group_stops_once_every_member_would_stop(make_tiny, tokenizer):
    model = make_tiny("llama")
    adapter = get_adapter(model)
    hp = TargetConfig(v_num_grad_steps=6, v_lr=0.5, clamp_norm_factor=4.0)
    start = compute_targets(model, tokenizer, adapter, [PLAYS, BORN], TEMPLATES, 1,
                            dataclasses.replace(hp, v_num_grad_steps=1, share_key_targets=False)).loss
    lo, hi = sorted(start.tolist())
    assert hi - lo > 0.1
    # a threshold between the two starting losses: alone, one request stops at once; the group waits for both
    between = dataclasses.replace(hp, early_stop_loss=(lo + hi) / 2)
    own = compute_targets(model, tokenizer, adapter, [PLAYS, BORN], TEMPLATES, 1,
                          dataclasses.replace(between, share_key_targets=False))
    joint = compute_targets(model, tokenizer, adapter, [PLAYS, BORN], TEMPLATES, 1, between)
    assert int(own.steps.min()) == 1 and int(joint.steps[0]) == int(joint.steps[1]) > 1
    assert int(joint.steps[0]) == 12 or float(joint.loss.max()) < (lo + hi) / 2  # its cap, or both below
    # above both: the group stops at its first step too
    above = compute_targets(model, tokenizer, adapter, [PLAYS, BORN], TEMPLATES, 1,
                            dataclasses.replace(hp, early_stop_loss=hi + 1.0))
    assert above.steps.tolist() == [1, 1]


def test_chunks_keep_a_group_together_and_refuse_one_that_cannot_fit(make_tiny, tokenizer):
    model = make_tiny("llama")
    adapter = get_adapter(model)
    reqs = [PLAYS, BORN, OTHER]
    assert plan_chunks(model, tokenizer, adapter, reqs, TEMPLATES, 1, 1, None, groups=[0, 0, 1]) == [(0, 2), (2, 3)]
    assert plan_chunks(model, tokenizer, adapter, reqs, TEMPLATES, 1, 1, None) == [(0, 1), (1, 2), (2, 3)]
    from lmedit.core.layout import build_layout
    from lmedit.core.targets import estimate_bytes
    alone = estimate_bytes(model, adapter, build_layout(tokenizer, reqs[:1], TEMPLATES), 1)
    pair = estimate_bytes(model, adapter, build_layout(tokenizer, reqs[:2], TEMPLATES), 1)
    assert plan_chunks(model, tokenizer, adapter, reqs, TEMPLATES, 1, 64, pair, groups=[0, 0, 1]) == [(0, 2), (2, 3)]
    with pytest.raises(RequestError, match="the 2 requests sharing the key of 'Lionel Messi'"):
        plan_chunks(model, tokenizer, adapter, reqs, TEMPLATES, 1, 64, (alone + pair) // 2, groups=[0, 0, 1])


def _editor(model, tok, covariances, **kw):
    return lmedit.Editor(model, tok, "memit", covariances=covariances(model, [1, 2]), **{**edit_kwargs("memit"), **kw})


def test_shared_vectors_are_reused_only_for_the_same_groups(fresh, tokenizer, covariances):
    m = fresh("llama")
    ed = _editor(m, tokenizer, covariances)
    reqs = [PLAYS, OTHER, BORN]
    tr = ed.compute_targets(reqs)
    assert tr.provenance["shared_keys"] == [[0, 2]]
    assert torch.equal(tr.targets[0], tr.targets[2])
    before = snapshot(m)
    part = tr.select([0, 1])  # a selection that splits the group: PLAYS's vector was optimised with BORN's fact
    assert part.provenance["shared_keys"] == [[0]]
    with pytest.raises(HyperparameterError, match="other groups of requests sharing a key"):
        ed.edit(reqs[:2], targets=part)
    own = ed.compute_targets(reqs, share_key_targets=False)
    assert "shared_keys" not in own.provenance
    with pytest.raises(HyperparameterError, match="other groups of requests sharing a key"):
        ed.edit(reqs, targets=own)
    assert_same(m, before)
    reordered = tr.select([2, 0, 1])  # the whole group, in another order
    assert reordered.provenance["shared_keys"] == [[0, 1]]
    assert tr.select([1]).provenance.get("shared_keys") is None
    joined = lmedit.TargetResult.concat([ed.compute_targets([OTHER]), tr])
    assert joined.provenance["shared_keys"] == [[1, 3]]
    result = ed.edit(reqs, targets=tr)
    assert result.targets.provenance["shared_keys"] == [[0, 2]]
    result.undo()
    ed.edit(reqs, targets=own, share_key_targets=False)  # own vectors go with the option off


def test_an_edit_of_two_facts_of_one_key_writes_their_one_target(fresh, tokenizer, covariances):
    """The edit moves the key's output to the shared target, which serves both facts; with a vector
    per fact it can reach neither (one key, one output: at best between the two targets)."""
    from lmedit.core.keys import residual_stream

    reached = {}
    for share in (True, False):
        m = fresh("llama")
        result = _editor(m, tokenizer, covariances, share_key_targets=share, mom2_update_weight=0.1).edit([PLAYS, BORN])
        z = residual_stream(m, tokenizer, get_adapter(m), [PLAYS, BORN], 2)
        assert torch.equal(z[0], z[1])
        reached[share] = (z[0], result.targets.targets)
    z, t = reached[True]
    assert torch.equal(t[0], t[1])
    z_own, t_own = reached[False]
    gap = float((t_own[0] - t_own[1]).norm())  # z_own is at least half of it from one of the two targets
    assert max(float((z_own - t_own[i]).norm()) for i in (0, 1)) >= gap / 2 - 1e-4
    print(float((z - t[0]).norm()), gap, [float((z_own - t_own[i]).norm()) for i in (0, 1)])
    assert float((z - t[0]).norm()) < 0.25 * gap
