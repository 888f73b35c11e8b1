"""Edits without undo history (flat memory for long sequential runs) and reuse of target vectors
(sweeping the preservation weight or ridge without re-optimising), on a tiny Llama."""

from __future__ import annotations

import pytest
import torch

import lmedit
import lmedit.editor as editor_module
from lmedit.errors import HyperparameterError, LmeditError

from helpers import OTHER, REQUESTS, assert_same, changed, edit_kwargs, edited_names, snapshot


def _editor(model, tok, covariances, method, **kw):
    args = {**edit_kwargs(method), **kw}
    return lmedit.Editor(model, tok, method, covariances=covariances(model, [1, 2, 3]), **args)


def test_keep_history_false_gives_the_same_weights_and_keeps_no_copies(fresh, tokenizer, covariances, tmp_path):
    a = fresh("llama")
    b = fresh("llama")
    before = snapshot(a)
    ea = _editor(a, tokenizer, covariances, "emmet")
    eb = _editor(b, tokenizer, covariances, "emmet", keep_history=False)
    ra = ea.edit(REQUESTS)
    rb = eb.edit(REQUESTS)
    for name in edited_names(a, "emmet"):
        assert torch.equal(a.state_dict()[name], b.state_dict()[name])
    assert ea.history == [ra] and eb.history == []
    assert rb.applied.originals == {} and set(rb.deltas) == {1, 2} and rb.state is lmedit.EditState.SEALED
    with pytest.raises(LmeditError, match="keep_history=False"):
        rb.undo()
    # the deltas are still there to save, and re-apply bit-exactly onto an unedited model
    twin = fresh("llama")
    lmedit.apply_deltas(twin, rb.save_deltas(tmp_path / "d.safetensors"))
    assert changed(twin, snapshot(b)) == set()
    # the ordinary edit still undoes exactly
    ra.undo()
    assert_same(a, before)


def test_history_less_edit_seals_the_edits_beneath_it(fresh, tokenizer, covariances, caplog):
    m = fresh("llama")
    ed = _editor(m, tokenizer, covariances, "memit")
    first = ed.edit(REQUESTS)
    after_first = snapshot(m)
    ed.keep_history = False
    with caplog.at_level("WARNING"):
        ed.edit(OTHER)
    assert "can no longer be undone" in caplog.text
    assert ed.history == [] and first.state is lmedit.EditState.SEALED
    with pytest.raises(LmeditError, match="later edit was made with keep_history=False"):
        first.undo()  # it would silently drop the later edit too
    assert changed(m, after_first) == edited_names(m, "memit")  # nothing was restored by the refused undo


def test_reused_targets_give_the_edit_of_fresh_targets(fresh, tokenizer, covariances, monkeypatch):
    m = fresh("llama")
    twin = fresh("llama")
    ed = _editor(m, tokenizer, covariances, "memit")
    res = ed.edit(REQUESTS)
    ed.undo()
    # a different preservation weight with the same targets: no optimisation runs ...
    monkeypatch.setattr(editor_module, "compute_targets", lambda *a, **k: pytest.fail("targets were recomputed"))
    reused = ed.edit(REQUESTS, targets=res.targets, mom2_update_weight=5.0)
    monkeypatch.undo()
    assert reused.hparams.mom2_update_weight == 5.0
    # ... and the weights equal those of an edit that optimised its own targets
    direct = _editor(twin, tokenizer, covariances, "memit", mom2_update_weight=5.0).edit(REQUESTS)
    torch.testing.assert_close(reused.targets.targets, direct.targets.targets)
    for l in reused.layers:
        assert float(reused.deltas[l].norm()) > 0
        torch.testing.assert_close(reused.deltas[l], direct.deltas[l], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case,match", [
    ("other_requests", "other requests"),
    ("model_changed", "weights as they were"),
    ("other_settings", "other target-optimisation settings"),
    ("other_layer", "another target layer"),
    ("other_site", "another target site"),
    ("other_editor", "another Editor"),
    ("rome", "sequential method"),
    ("not_targets", "earlier EditResult"),
])
def test_reused_targets_are_refused_when_they_do_not_fit(case, match, fresh, tokenizer, covariances):
    m = fresh("llama")
    ed = _editor(m, tokenizer, covariances, "memit")
    res = ed.edit(REQUESTS)
    tr, reqs, kw = res.targets, REQUESTS, {}
    if case != "model_changed":
        res.undo()
    if case == "other_requests":
        reqs = REQUESTS[:1]
    elif case == "other_settings":
        kw = dict(v_lr=0.1)
    elif case == "other_layer":
        kw = dict(layers=[1, 3])
    elif case == "other_site":
        kw = dict(target_site="mlp")
    elif case == "other_editor":
        ed = _editor(m, tokenizer, covariances, "memit")
    elif case == "rome":
        ed = _editor(m, tokenizer, covariances, "rome")
    elif case == "not_targets":
        tr = tr.targets
    before = snapshot(m)
    with pytest.raises(HyperparameterError, match=match):
        ed.edit(reqs, targets=tr, **kw)
    assert_same(m, before)


def test_targets_saved_and_loaded_edit_like_fresh_ones_in_another_editor(fresh, tokenizer, covariances, tmp_path,
                                                                        monkeypatch):
    """compute_targets + save_targets in one Editor, load_targets in another (of another method
    sharing the target settings), then chunks joined: the same weights as an edit that optimised."""
    m, twin = fresh("llama"), fresh("llama")
    ed = _editor(m, tokenizer, covariances, "memit")
    before = snapshot(m)
    parts = [ed.compute_targets(REQUESTS[:1]), ed.compute_targets(REQUESTS[1:])]
    assert_same(m, before)  # computing targets edits nothing
    paths = [ed.save_targets(p, tmp_path / f"t{i}.safetensors") for i, p in enumerate(parts)]
    other = _editor(m, tokenizer, covariances, "emmet")
    monkeypatch.setattr(editor_module, "compute_targets", lambda *a, **k: pytest.fail("targets were recomputed"))
    loaded = lmedit.TargetResult.concat([other.load_targets(p) for p in paths])
    reused = other.edit(REQUESTS, targets=loaded)
    monkeypatch.undo()
    direct = _editor(twin, tokenizer, covariances, "emmet").edit(REQUESTS)
    # chunks of one and two requests against one batch of two: equal up to float32 batching noise,
    # which Adam's steps carry into the vectors (about 3e-4 relative here)
    torch.testing.assert_close(loaded.targets, direct.targets.targets, rtol=2e-3, atol=2e-3)
    for l in reused.layers:
        assert float(reused.deltas[l].norm()) > 0
        torch.testing.assert_close(reused.deltas[l], direct.deltas[l], rtol=5e-3, atol=5e-4)
    # a part of the joined vectors is what was computed for those requests, and edits them
    assert torch.equal(loaded.part(1, 2).targets, parts[1].targets)
    assert loaded.part(1, 2).provenance["requests"] == parts[1].provenance["requests"]
    reused.undo()
    other.edit(REQUESTS[1:], targets=loaded.part(1, 2)).undo()
    reused = other.edit(REQUESTS, targets=loaded)
    # on the edited weights the file no longer describes the model: refused, nothing changes
    after = snapshot(m)
    with pytest.raises(lmedit.CacheError, match="other weights"):
        other.load_targets(paths[0])
    assert_same(m, after)
    # after the undo it fits again
    reused.undo()
    assert torch.equal(other.load_targets(paths[0]).targets, parts[0].targets)


def test_bad_target_files_and_stale_targets_are_refused(fresh, tokenizer, covariances, tmp_path):
    m = fresh("llama")
    ed = _editor(m, tokenizer, covariances, "memit")
    tr = ed.compute_targets(REQUESTS)
    path = ed.save_targets(tr, tmp_path / "t.safetensors")
    good = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(good[: len(good) // 2])
    with pytest.raises(lmedit.CacheError, match="unreadable or corrupt"):
        ed.load_targets(tmp_path / "cut.safetensors")
    with pytest.raises(lmedit.CacheError, match="does not exist"):
        ed.load_targets(tmp_path / "missing.safetensors")
    deltas = ed.edit(REQUESTS).save_deltas(tmp_path / "d.safetensors")
    with pytest.raises(lmedit.CacheError, match="not an lmedit targets file"):
        ed.load_targets(deltas)
    with pytest.raises(HyperparameterError, match="weights changed"):
        ed.save_targets(tr, tmp_path / "stale.safetensors")  # the edit above changed the weights
    assert not (tmp_path / "stale.safetensors").exists()
    with pytest.raises(HyperparameterError, match="computed by this Editor"):
        _editor(m, tokenizer, covariances, "memit").save_targets(tr, tmp_path / "x.safetensors")
    with pytest.raises(HyperparameterError, match="after the previous request's"):
        _editor(m, tokenizer, covariances, "rome").compute_targets(REQUESTS)


def test_targets_from_other_weights_only_when_allowed(fresh, tokenizer, covariances, tmp_path):
    """Frozen targets (benchmarks/lifelong.py --frozen-targets): vectors computed on the unedited model,
    refused on edited weights unless allow_other_weights, then selected out of order and edited to
    exactly; re-saving them keeps the weights they came from; another base model is refused."""
    m = fresh("llama")
    ed = _editor(m, tokenizer, covariances, "memit", keep_history=False)
    tr = ed.compute_targets(REQUESTS)
    path = ed.save_targets(tr, tmp_path / "t.safetensors")
    ed.edit(OTHER)
    after = snapshot(m)
    with pytest.raises(lmedit.CacheError, match="other weights"):
        ed.load_targets(path)
    frozen = ed.load_targets(path, allow_other_weights=True)
    assert_same(m, after)
    assert frozen.provenance["other_weights"] and torch.equal(frozen.targets, tr.targets)
    picked = frozen.select([1, 0])
    assert torch.equal(picked.targets, tr.targets.flip(0)) and torch.equal(picked.steps, tr.steps.flip(0))
    assert picked.provenance["requests"] == list(reversed(frozen.provenance["requests"]))
    with pytest.raises(IndexError, match="out of range"):
        frozen.select([2])
    from lmedit.core.keys import residual_stream
    batch = list(reversed(REQUESTS))
    gap = (picked.targets - residual_stream(m, tokenizer, ed.adapter, batch, 2)).norm()
    ed.edit(batch, targets=picked)
    # the edit moved these subjects' outputs most of the way to the given vectors (none were optimised)
    assert (picked.targets - residual_stream(m, tokenizer, ed.adapter, batch, 2)).norm() < 0.5 * gap
    # re-saved, they still say they describe the unedited weights: a fresh Editor there takes them as they are
    again = ed.save_targets(ed.load_targets(path, allow_other_weights=True), tmp_path / "again.safetensors")
    twin = fresh("llama")
    unedited = _editor(twin, tokenizer, covariances, "memit")
    assert frozen.provenance["other_weights"] == unedited._weights_digest()
    assert torch.equal(unedited.load_targets(again).targets, tr.targets)
    # a file written before the base model was recorded joins one written after it
    from lmedit.core.targets import read_targets, write_targets
    res_old, prov = read_targets(again)
    write_targets(tmp_path / "old.safetensors", res_old, {k: v for k, v in prov.items() if k != "base"})
    both = lmedit.TargetResult.concat([ed.load_targets(p, allow_other_weights=True)
                                       for p in (again, tmp_path / "old.safetensors")])
    assert len(both.provenance["requests"]) == 4 and both.provenance["other_weights"]
    # a file that does not say which weights it describes is never re-saved as if it described these
    write_targets(tmp_path / "anon.safetensors", res_old, {k: v for k, v in prov.items() if k not in ("base", "weights")})
    with pytest.raises(HyperparameterError, match="did not say which weights"):
        ed.save_targets(ed.load_targets(tmp_path / "anon.safetensors", allow_other_weights=True),
                        tmp_path / "anon2.safetensors")
    assert not (tmp_path / "anon2.safetensors").exists()
    # another base model (other weights from the start): refused even with the option
    other = fresh("llama", seed=1)
    with pytest.raises(lmedit.CacheError, match="another base model"):
        _editor(other, tokenizer, covariances, "memit").load_targets(path, allow_other_weights=True)


def test_lifelong_frozen_targets_absolute_and_delta(fresh, tokenizer, covariances, tmp_path):
    """benchmarks/lifelong.py's FrozenTargets: a batch gets its precomputed vectors in its own order;
    in delta mode re-based on the model as it is now; a request without one, or a --set that changes
    the target settings, stops the run with its reason."""
    import importlib.util
    from pathlib import Path

    from lmedit.core.keys import residual_stream

    spec = importlib.util.spec_from_file_location("lifelong", Path(__file__).parents[2] / "benchmarks" / "lifelong.py")
    lifelong = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lifelong)
    m = fresh("llama")
    ed = _editor(m, tokenizer, covariances, "memit", keep_history=False)
    tr = ed.compute_targets(REQUESTS)
    ed.save_targets(tr, tmp_path / "t.safetensors")
    frozen = lifelong.FrozenTargets(tmp_path)
    assert frozen.layer == 2 and frozen.config == tr.provenance["config"]
    ed.edit(OTHER)
    batch = list(reversed(REQUESTS))
    absolute = frozen.for_batch(ed, batch)
    assert torch.equal(absolute.targets, tr.targets.flip(0))
    delta = frozen.for_batch(ed, batch, "delta")
    now = residual_stream(m, tokenizer, ed.adapter, batch, 2)
    assert torch.equal(delta.init, now) and torch.equal(delta.targets, now + tr.delta.flip(0))
    assert delta.value is None  # v* was the unedited model's
    assert not torch.allclose(delta.targets, absolute.targets)  # the edit of OTHER moved these subjects
    ed.edit(batch, targets=delta)
    assert (delta.targets - residual_stream(m, tokenizer, ed.adapter, batch, 2)).norm() < 0.5 * tr.delta.norm()
    with pytest.raises(SystemExit, match="no precomputed target"):
        frozen.for_batch(ed, OTHER)
    with pytest.raises(SystemExit, match="changes target settings"):
        frozen.overrides("m", {"v_lr": tr.provenance["config"]["v_lr"] * 2})
    # a directory holding vectors of two target settings is refused, naming the directory
    other = _editor(fresh("llama"), tokenizer, covariances, "memit", v_lr=tr.provenance["config"]["v_lr"] * 2)
    other.save_targets(other.compute_targets(OTHER), tmp_path / "u.safetensors")
    with pytest.raises(SystemExit, match="2 different"):
        lifelong.FrozenTargets(tmp_path)


def test_lifelong_start_picks_the_records_and_protect_refuses_an_overlap(tmp_path):
    """benchmarks/lifelong.py --start (no model): the --n records from --start; --protect may not overlap
    them; an --out begun with another --start, or records the fluency prompts come from, are refused."""
    import argparse
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("lifelong", Path(__file__).parents[2] / "benchmarks" / "lifelong.py")
    lifelong = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lifelong)
    data = tmp_path / "facts.json"
    data.write_text(json.dumps([{"prompt": "{} is in", "subject": f"S{i}", "target_new": "Paris", "target_true": "Rome"}
                                for i in range(10)]))
    args = argparse.Namespace(data=str(data), start=4, n=3)
    assert [r.subject for r in lifelong.edited_records(args)] == ["S4", "S5", "S6"]
    with pytest.raises(SystemExit, match="has only 10 records"):
        lifelong.edited_records(argparse.Namespace(data=str(data), start=8, n=3))
    assert [r.subject for r in lifelong.protected_facts("0:4", args)[0]] == ["S0", "S1", "S2", "S3"]
    assert lifelong.protected_facts("7:10@3", args)[1] == 3.0
    for overlapping in ("3:5", "6:8", "0:10"):
        with pytest.raises(SystemExit, match="overlap the edited ones"):
            lifelong.protected_facts(overlapping, args)
    with pytest.raises(SystemExit, match="must be 0 or more"):
        lifelong.edited_records(argparse.Namespace(data=str(data), start=-1, n=3))
    # before any work: an --out begun with another --start is refused, and the fluency prompts' records stay unedited
    out = tmp_path / "out"
    out.mkdir()
    check = argparse.Namespace(data=str(data), start=4, n=3, out=str(out), fluency_prompts=2)
    lifelong.check_start(check, ["a"])  # nothing begun yet
    (out / "a.json").write_text(json.dumps({"rows": [{"edits": 0}], "start": 4}))
    lifelong.check_start(check, ["a"])
    (out / "unedited.json").write_text(json.dumps({"first": {}}))  # written before --start existed: start 0
    with pytest.raises(SystemExit, match="begun with --start 0"):
        lifelong.check_start(check, ["a"])
    (out / "unedited.json").unlink()
    with pytest.raises(SystemExit, match="begun with --start 4"):
        lifelong.check_start(argparse.Namespace(**{**vars(check), "start": 0}), ["a"])
    with pytest.raises(SystemExit, match="fluency prompts"):
        lifelong.check_start(argparse.Namespace(**{**vars(check), "fluency_prompts": 4}), ["b"])


def test_lifelong_computes_missing_frozen_targets_in_conflict_free_sets(fresh, tokenizer, covariances, tmp_path,
                                                                         monkeypatch):
    """benchmarks/lifelong.py --frozen-targets completes the vectors a directory lacks (records its writer
    dropped as conflicts); two of those that conflict with each other get one file each, since one
    computation cannot hold both, and every request of the run then has its vector."""
    import argparse
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("lifelong", Path(__file__).parents[2] / "benchmarks" / "lifelong.py")
    lifelong = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lifelong)
    m = fresh("llama")
    ed = _editor(m, tokenizer, covariances, "memit")
    given = tmp_path / "given"
    given.mkdir()
    ed.save_targets(ed.compute_targets(REQUESTS), given / "t.safetensors")
    clash = [lmedit.EditRequest("The most famous painter is {}", "Leonardo", target, "Vinci")
             for target in ("Berlin", "Madrid")]
    data = tmp_path / "facts.json"
    data.write_text(json.dumps([r.to_dict() for r in REQUESTS + clash + OTHER]))
    monkeypatch.setattr(lifelong, "load", lambda args: (m, tokenizer))
    real = lmedit.Editor  # the tests' templates, not those a preset would generate on the random model
    monkeypatch.setattr(lmedit, "Editor", lambda *a, **kw: real(*a, **{**kw, **{k: edit_kwargs("memit")[k]
                                                                             for k in ("context_templates", "chat_prompts")}}))
    args = argparse.Namespace(data=str(data), start=0, n=5, batch_size=2, out=str(tmp_path / "out"),
                              frozen_targets=str(given), quiet=True)
    frozen = lifelong.frozen_targets(args)
    assert len(list((tmp_path / "out" / "frozen_targets").glob("*.safetensors"))) == 2
    for batch in ([REQUESTS[0], clash[0]], [clash[1], OTHER[0]]):
        got = frozen.for_batch(ed, batch)
        assert [tuple(k) for k in got.provenance["requests"]] == [lifelong.request_key(r) for r in batch]
    with pytest.raises(lmedit.RequestError, match="conflicting edits"):
        ed.compute_targets(clash)  # why the split is needed
