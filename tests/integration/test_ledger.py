"""The edit ledger: round trip bit for bit, resume after a kill equals an uninterrupted run, and
bad ledgers refused with every weight unchanged."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import lmedit
from helpers import OTHER, REQUESTS, assert_same, edit_kwargs, snapshot, spd_covariances
from lmedit.errors import CacheError, HyperparameterError, LmeditError
from lmedit.ledger import Ledger

BATCHES = [REQUESTS[:1], REQUESTS[1:], OTHER]


def adapter_weight(model, layer: int = 2) -> torch.Tensor:
    return lmedit.get_adapter(model).weight(model, layer).detach()


def _editor(model, tok, method="encore", **kw):
    args = edit_kwargs("memit")
    return lmedit.Editor(model, tok, method, covariances=spd_covariances(model, args["layers"]), **args, **kw)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, fresh, tokenizer):
    """Three batches of ENCORE (earlier keys preserved, MPES) in one Editor, appended to a ledger."""
    path = tmp_path_factory.mktemp("ledger") / "full"
    model = fresh("llama")
    ed = _editor(model, tokenizer, ledger=path, keep_history=False)
    for b in BATCHES:
        ed.edit(b)
    return path, snapshot(model), {l: e.clone() for l, e in ed.earlier.items()}


def test_round_trip_is_bit_exact(uninterrupted, fresh, tokenizer):
    path, weights, earlier = uninterrupted
    model = fresh("llama")
    ed = lmedit.Editor.load(model, tokenizer, path, covariances=spd_covariances(model, [1, 2]))
    assert_same(model, weights)
    assert ed.n_earlier == 3 and all(torch.equal(ed.earlier[l], earlier[l]) for l in earlier)
    assert ed.method == "encore" and ed.hparams.update_norm_lambda == 10.0


def test_a_loaded_ledger_does_not_pin_its_chunk_size(fresh, tokenizer, tmp_path):
    """How many requests were optimised together is the writing machine's choice (the vectors do not
    depend on it): a ledger written with chunks of 1 loads with this machine's default, or an override."""
    model = fresh("llama")
    ed = _editor(model, tokenizer, ledger=tmp_path / "l", chunk_requests=1)
    ed.edit(REQUESTS[:1])
    assert Ledger.open(tmp_path / "l").batches[-1]["hparams"]["chunk_requests"] == 1
    again = lmedit.Editor.load(fresh("llama"), tokenizer, tmp_path / "l", covariances=spd_covariances(model, [1, 2]))
    assert again.hparams.chunk_requests == 0 and again.hparams.update_norm_lambda == 10.0
    pinned = lmedit.Editor.load(fresh("llama"), tokenizer, tmp_path / "l", covariances=spd_covariances(model, [1, 2]),
                                chunk_requests=5)
    assert pinned.hparams.chunk_requests == 5


def test_resume_after_a_kill_equals_an_uninterrupted_run(uninterrupted, fresh, tokenizer, tmp_path, monkeypatch):
    path, weights, earlier = uninterrupted
    partial = tmp_path / "partial"
    model = fresh("llama")
    ed = _editor(model, tokenizer, ledger=partial, keep_history=False)
    ed.edit(BATCHES[0])
    import lmedit.ledger as ledger_module

    real = ledger_module.Ledger._write_manifest

    def killed(self):  # the process dies while committing the second batch
        raise KeyboardInterrupt

    monkeypatch.setattr(ledger_module.Ledger, "_write_manifest", killed)
    with pytest.raises(KeyboardInterrupt):
        ed.edit(BATCHES[1])
    monkeypatch.setattr(ledger_module.Ledger, "_write_manifest", real)
    assert len(Ledger.open(partial).batches) == 1  # the interrupted batch is not in the ledger
    model = fresh("llama")  # a new process: the base model again
    ed = lmedit.Editor.load(model, tokenizer, partial, covariances=spd_covariances(model, [1, 2]))
    for b in BATCHES[1:]:
        ed.edit(b)
    assert_same(model, weights)
    assert all(torch.equal(ed.earlier[l], earlier[l]) for l in earlier)
    assert len(Ledger.open(partial).batches) == 3


def _corrupt(path):
    f = path / "batch-00002.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))


def _truncate(path):
    f = path / "batch-00001.safetensors"
    f.write_bytes(f.read_bytes()[:100])


def _version(path):
    m = json.loads((path / "manifest.json").read_text())
    m["version"] = 99
    (path / "manifest.json").write_text(json.dumps(m))


def _missing(path):
    (path / "batch-00003.json").unlink()


def _not_a_ledger(path):
    (path / "manifest.json").write_text('{"format": "something else"}')


@pytest.mark.parametrize("damage,match", [
    (_corrupt, "batch-00002.safetensors fails its sha256"),
    (_truncate, "batch-00001.safetensors fails its sha256"),
    (_version, "layout version 99"),
    (_missing, "batch-00003.json is missing"),
    (_not_a_ledger, "not an lmedit ledger"),
])
def test_bad_ledgers_are_refused_and_change_nothing(uninterrupted, fresh, tokenizer, tmp_path, damage, match):
    bad = tmp_path / "bad"
    shutil.copytree(uninterrupted[0], bad)
    damage(bad)
    model = fresh("llama")
    before = snapshot(model)
    with pytest.raises(CacheError, match=match):
        lmedit.Editor.load(model, tokenizer, bad, covariances=spd_covariances(model, [1, 2]))
    assert_same(model, before)


def test_another_or_edited_base_model_is_refused(uninterrupted, fresh, tokenizer):
    other = fresh("llama", seed=1)
    before = snapshot(other)
    with pytest.raises(CacheError, match="was written for model"):
        lmedit.Editor.load(other, tokenizer, uninterrupted[0], covariances=spd_covariances(other, [1, 2]))
    assert_same(other, before)
    model = fresh("llama")
    lmedit.Editor.load(model, tokenizer, uninterrupted[0], covariances=spd_covariances(model, [1, 2]))
    edited = snapshot(model)
    with pytest.raises(CacheError, match="edited already"):  # the ledger must not be applied twice
        lmedit.Editor.load(model, tokenizer, uninterrupted[0], covariances=spd_covariances(model, [1, 2]))
    assert_same(model, edited)


def test_a_new_editor_refuses_an_existing_ledger(uninterrupted, fresh, tokenizer):
    model = fresh("llama")
    with pytest.raises(CacheError, match="open it with Editor.load"):
        _editor(model, tokenizer, ledger=uninterrupted[0])


def test_undo_drops_the_batch_from_the_ledger(uninterrupted, fresh, tokenizer, tmp_path):
    """Editor.undo with a ledger: the weights go back bit for bit and the ledger loses the batch, so
    the base model plus the ledger is the model before it; editing on gives the uninterrupted run
    (the sum of earlier keys is the same up to float64 rounding of the subtraction)."""
    weights = uninterrupted[1]
    model = fresh("llama")
    ed = _editor(model, tokenizer, ledger=tmp_path / "l")
    for b in BATCHES[:2]:
        ed.edit(b)
    after_two, earlier_two = snapshot(model), {l: e.clone() for l, e in ed.earlier.items()}
    ed.edit(REQUESTS)  # a wrong batch
    ed.undo()
    assert_same(model, after_two)
    assert len(Ledger.open(tmp_path / "l").batches) == 2 and ed.n_earlier == 2
    assert all(torch.allclose(ed.earlier[l], earlier_two[l], rtol=0, atol=1e-9) for l in earlier_two)
    reloaded = fresh("llama")
    again = lmedit.Editor.load(reloaded, tokenizer, tmp_path / "l", covariances=spd_covariances(reloaded, [1, 2]))
    assert_same(reloaded, after_two)
    assert again.n_earlier == 2 and all(torch.equal(again.earlier[l], ed.earlier[l]) for l in earlier_two)
    ed.edit(BATCHES[2])
    for name, w in snapshot(model).items():
        assert torch.allclose(w, weights[name], rtol=1e-4, atol=1e-6), name
    ed.undo(), ed.undo(), ed.undo()  # down to no batch at all: a new, empty ledger directory
    assert not (tmp_path / "l" / "manifest.json").exists() and not list((tmp_path / "l").glob("*.safetensors"))
    assert_same(model, snapshot(fresh("llama")))
    ed.edit(BATCHES[0])  # the same Editor appends to it again
    assert len(Ledger.open(tmp_path / "l").batches) == 1
    delta_file = tmp_path / "d.safetensors"
    ed.edit(BATCHES[1]).save_deltas(delta_file)
    ed.undo()
    ed.apply_deltas(delta_file)  # on the history, but no batch of the ledger: refused
    with pytest.raises(LmeditError, match="not in the ledger"):
        ed.undo()
    other = _editor(fresh("llama"), tokenizer, ledger=tmp_path / "m")
    other.edit(BATCHES[0])
    Ledger.open(tmp_path / "m").truncate(0)  # changed behind the Editor's back: its undo is refused
    with pytest.raises(LmeditError, match="does not end with this edit's batch"):
        other.undo()


def test_cli_undo_truncates_and_refuses_what_it_cannot_take_out(uninterrupted, fresh, tokenizer, tmp_path, capsys, monkeypatch):
    from lmedit.cli import main
    monkeypatch.setenv("LMEDIT_NUM_THREADS", str(torch.get_num_threads()))  # main() sets torch's threads

    path = tmp_path / "copy"
    shutil.copytree(uninterrupted[0], path)
    for bad in ("0", "4"):
        assert main(["ledger", "undo", str(path), "--batches", bad]) == 2
        assert "--batches must be 1..3" in capsys.readouterr().err
    assert main(["ledger", "undo", str(path), "--batches", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == {"path": str(path), "dropped": [2, 3], "dropped_requests": 2, "batches": 1, "requests": 1}
    assert sorted(f.name for f in path.iterdir()) == ["batch-00001.json", "batch-00001.safetensors", "manifest.json",
                                                     "state-00001.safetensors"]
    # the same as a ledger of the first batch alone
    model = fresh("llama")
    one = _editor(model, tokenizer, ledger=tmp_path / "one", keep_history=False)
    one.edit(BATCHES[0])
    loaded = fresh("llama")
    again = lmedit.Editor.load(loaded, tokenizer, path, covariances=spd_covariances(loaded, [1, 2]))
    assert_same(loaded, snapshot(model))
    assert all(torch.allclose(again.earlier[l], one.earlier[l], rtol=0, atol=1e-9) for l in one.earlier)

    # protected facts stay protected when the batch they came with is dropped (as Editor.undo keeps them)
    model = fresh("llama")
    ed = _editor(model, tokenizer, ledger=tmp_path / "p", keep_history=False)
    ed.edit(BATCHES[0])
    ed.protect(OTHER)
    ed.edit(BATCHES[1])
    live = _editor(fresh("llama"), tokenizer, keep_history=False)
    live.edit(BATCHES[0])
    live.protect(OTHER)
    Ledger.open(tmp_path / "p").truncate(1)
    loaded = fresh("llama")
    again = lmedit.Editor.load(loaded, tokenizer, tmp_path / "p", covariances=spd_covariances(loaded, [1, 2]))
    assert again.n_protected == 1 and again.n_earlier == 1
    assert all(torch.allclose(again.earlier[l], live.earlier[l], rtol=0, atol=1e-9) for l in live.earlier)
    # ... but they need a batch to travel with: dropping every batch is refused, nothing changes
    files = {f.name: f.read_bytes() for f in (tmp_path / "p").iterdir()}
    with pytest.raises(CacheError, match="protected facts travel with a batch"):
        Ledger.open(tmp_path / "p").truncate(0)
    assert {f.name: f.read_bytes() for f in (tmp_path / "p").iterdir()} == files
    # a dropped batch that fails its checksum: refused, nothing changes
    with open(path / "batch-00001.safetensors", "r+b") as f:
        f.seek(-8, 2)
        f.write(b"corrupt!")
    files = {f.name: f.read_bytes() for f in path.iterdir()}
    assert main(["ledger", "undo", str(path)]) == 2
    assert "fails its sha256 checksum" in capsys.readouterr().err
    assert {f.name: f.read_bytes() for f in path.iterdir()} == files


def test_summary_reports_batches_and_norm_growth(uninterrupted, fresh):
    model = fresh("llama")
    adapter = lmedit.get_adapter(model)
    norms = {l: float(adapter.weight(model, l).detach().norm()) for l in (1, 2)}
    s = Ledger.open(uninterrupted[0]).summary(norms)
    assert s["batches"] == 3 and s["requests"] == 3 and s["methods"] == ["encore"]
    total = sum(Ledger.open(uninterrupted[0]).read_batch(i).deltas[2].double() for i in range(3))
    assert s["update_norm"][2] == pytest.approx(float(total.norm()))
    assert s["relative_change"][2] == pytest.approx(float(total.norm()) / norms[2])


def test_protected_facts_travel_with_the_ledger(fresh, tokenizer, tmp_path):
    """protect() before the first batch: the manifest counts the facts, the state holds their keys,
    and a reloaded Editor has both (its next batch preserves them as the uninterrupted one would)."""
    model = fresh("llama")
    ed = _editor(model, tokenizer, ledger=tmp_path / "l", keep_history=False)
    ed.protect(OTHER, weight=5.0)
    ed.edit(REQUESTS)
    assert Ledger.open(tmp_path / "l").summary()["protected"] == 1
    again = lmedit.Editor.load(fresh("llama"), tokenizer, tmp_path / "l", covariances=spd_covariances(model, [1, 2]))
    assert again.n_protected == 1 and again.n_earlier == 2
    assert all(torch.equal(again.earlier[l], ed.earlier[l]) for l in ed.earlier)


def test_cli_edit_with_a_ledger_creates_appends_and_shows(fresh, tokenizer, tmp_path, monkeypatch, capsys):
    """`lmedit edit --ledger DIR` twice, then `lmedit ledger show DIR --json`; the base model plus the
    ledger is the model the two CLI edits made."""
    from lmedit.cli import main

    model = fresh("llama")
    model.save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    for i, reqs in enumerate(BATCHES[:2]):
        (tmp_path / f"b{i}.json").write_text(json.dumps([r.to_dict() for r in reqs]))
    monkeypatch.setenv("LMEDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LMEDIT_NUM_THREADS", str(torch.get_num_threads()))
    threads = torch.get_num_threads()
    common = ["--model", str(tmp_path / "llama"), "--quiet", "--json", "--ledger", str(tmp_path / "led")]
    sets = ["--set", "mom2_n_samples=20", "--set", "v_num_grad_steps=4", "--set", "context_templates=[[5,1]]",
            "--layers", "1,2"]
    try:
        assert main(["edit", "--requests", str(tmp_path / "b0.json"), "--method", "encore", *sets, *common]) == 0
        first = json.loads(capsys.readouterr().out)
        assert main(["edit", "--requests", str(tmp_path / "b1.json"), *common, "--save-lora", str(tmp_path / "lora")]) == 0
        second = json.loads(capsys.readouterr().out)
        assert main(["ledger", "show", str(tmp_path / "led"), "--model", str(tmp_path / "llama"), "--json"]) == 0
        shown = json.loads(capsys.readouterr().out)
        assert main(["ledger", "lora", str(tmp_path / "led"), "--model", str(tmp_path / "llama"), "--json",
                     "--out", str(tmp_path / "lora-cut"), "--lora-rank", "1"]) == 0
        cut = json.loads(capsys.readouterr().out)
        assert main(["ledger", "export", str(tmp_path / "led"), "--model", str(tmp_path / "llama"), "--json",
                     "--out", str(tmp_path / "merged")]) == 0
        exported = json.loads(capsys.readouterr().out)
        assert main(["ledger", "export", str(tmp_path / "led"), "--model", str(tmp_path / "llama"),
                     "--out", str(tmp_path / "merged")]) == 2  # an existing model directory is never replaced
        assert "not an empty directory" in capsys.readouterr().err
    finally:
        torch.set_num_threads(threads)
    assert first["ledger"] == {"path": str(tmp_path / "led"), "batches": 1, "requests": 1}
    assert second["ledger"]["batches"] == 2 and second["method"] == "encore"  # the ledger's method carries on
    assert second["hparams"]["mom2_n_samples"] == 20 and second["hparams"]["layers"] == [1, 2]
    assert shown["batches"] == 2 and shown["requests"] == 2 and shown["methods"] == ["encore"]
    assert set(shown["relative_change"]) == {"1", "2"} and all(v > 0 for v in shown["relative_change"].values())
    # --save-lora with a ledger exports both batches; `ledger lora --lora-rank 1` truncates them
    total = Ledger.open(tmp_path / "led").total_deltas()
    n = second["ledger"]["requests"]
    assert all(1 < l["rank"] == l["full_rank"] <= n for l in second["lora"]["layers"])
    assert second["lora"]["max_rel_error"] < 1e-6
    assert all(l["rank"] == 1 < l["full_rank"] for l in cut["layers"]) and cut["max_rel_error"] > 0
    assert exported["batches"] == 2 and exported["requests"] == 2
    merged_model, _ = lmedit.load_model(str(tmp_path / "merged"))  # a loadable model: the base plus the ledger
    replayed, _ = lmedit.load_model(str(tmp_path / "llama"))
    lmedit.Editor.load(replayed, tokenizer, tmp_path / "led")
    assert_same(merged_model, snapshot(replayed))
    assert not torch.equal(adapter_weight(merged_model), adapter_weight(lmedit.load_model(str(tmp_path / "llama"))[0]))
    # the first fact with a new answer: the report names the earlier edit it replaces, `ledger show` counts it
    (tmp_path / "again.json").write_text(json.dumps([r.to_dict() for r in AGAIN]))
    assert main(["edit", "--requests", str(tmp_path / "again.json"), *common]) == 0
    assert json.loads(capsys.readouterr().out)["superseded"] == [
        {"subject": "Xanadu", "prompt": REQUESTS[0].prompt.format("Xanadu")}]
    assert main(["ledger", "show", str(tmp_path / "led"), "--model", str(tmp_path / "llama")]) == 0
    assert "3 batches, 3 requests" in (out := capsys.readouterr().out) and "1 fact edited again" in out
    peft = pytest.importorskip("peft")
    adapter = lmedit.get_adapter(model)
    merged = peft.PeftModel.from_pretrained(fresh("llama"), str(tmp_path / "lora")).merge_and_unload()
    for l in (1, 2):
        want = adapter.weight(model, l).detach().double() + total[l]  # float32 rounding of W0 + the ledger
        assert torch.allclose(adapter.weight(merged, l).detach().double(), want, rtol=0,
                              atol=2 * torch.finfo(torch.float32).eps * float(want.abs().max()))


def test_resume_with_refreshed_keys_equals_an_uninterrupted_run(fresh, tokenizer, tmp_path):
    """refresh_earlier_keys reads the earlier facts' keys again before each batch: a reloaded Editor
    knows those facts from the ledger's requests, so resuming gives the same weights and state bit
    for bit; protected facts, whose prompts a ledger does not keep, are refused with the weights as loaded."""
    def run(path, batches, model):
        ed = _editor(model, tokenizer, ledger=path, keep_history=False, refresh_earlier_keys=True)
        for b in batches:
            ed.edit(b)
        return ed

    whole = fresh("llama")
    ed = run(tmp_path / "whole", BATCHES, whole)
    assert [(f.prompt, f.subject) for f in ed.earlier_facts] == [(r.prompt, r.subject) for b in BATCHES for r in b]
    part = fresh("llama")
    run(tmp_path / "part", BATCHES[:2], part)
    model = fresh("llama")
    again = lmedit.Editor.load(model, tokenizer, tmp_path / "part", covariances=spd_covariances(model, [1, 2]))
    assert again.hparams.refresh_earlier_keys and len(again.earlier_facts) == 2
    again.edit(BATCHES[2])
    assert_same(model, snapshot(whole))
    assert all(torch.equal(again.earlier[l], ed.earlier[l]) for l in ed.earlier)

    protected = fresh("llama")
    p = _editor(protected, tokenizer, ledger=tmp_path / "p", keep_history=False, refresh_earlier_keys=True)
    p.protect(OTHER)
    p.edit(REQUESTS[:1])
    model = fresh("llama")
    loaded = lmedit.Editor.load(model, tokenizer, tmp_path / "p", covariances=spd_covariances(model, [1, 2]))
    before = snapshot(model)
    with pytest.raises(HyperparameterError, match="protected fact"):
        loaded.edit(REQUESTS[1:])
    assert_same(model, before)
    assert len(Ledger.open(tmp_path / "p").batches) == 1


def test_a_ledger_from_before_the_lifelong_options_loads_with_their_defaults(uninterrupted, fresh, tokenizer, tmp_path):
    """A ledger whose batches were written before preserve_weight and refresh_earlier_keys existed
    (no such keys in their hyperparameters) loads bit for bit, with the defaults 1.0 and False."""
    path, weights, earlier = uninterrupted
    old = tmp_path / "old"
    shutil.copytree(path, old)
    m = json.loads((old / "manifest.json").read_text())
    for b in m["batches"]:
        assert b["hparams"].pop("preserve_weight") == 1.0 and b["hparams"].pop("refresh_earlier_keys") is False
        assert b["hparams"].pop("supersede_edits") is True
    (old / "manifest.json").write_text(json.dumps(m))
    model = fresh("llama")
    ed = lmedit.Editor.load(model, tokenizer, old, covariances=spd_covariances(model, [1, 2]))
    assert_same(model, weights)
    assert ed.hparams.preserve_weight == 1.0 and not ed.hparams.refresh_earlier_keys
    assert not ed.hparams.supersede_edits  # older than the option: it goes on keeping earlier keys, as written
    assert all(torch.equal(ed.earlier[l], earlier[l]) for l in earlier)


def _compactable(uninterrupted, tmp_path, name="c"):
    path = tmp_path / name
    shutil.copytree(uninterrupted[0], path)
    return path, Ledger.open(path)


def _base(fresh, seed=0):
    model = fresh("llama", seed=seed)
    adapter = lmedit.get_adapter(model)
    from lmedit.models.loading import fingerprint

    return model, adapter, fingerprint(model, adapter)


def test_compacting_keeps_the_edited_model_and_the_state_bit_for_bit(uninterrupted, fresh, tokenizer, tmp_path):
    """Every batch folded into one exact total: the base model plus the ledger is the same model bit for
    bit, with the same sum of earlier keys, and the next edit appends the same batch as it would to the
    ledger uncompacted; the folded batches' files are gone and the base model used is left as it was."""
    path, weights, earlier = uninterrupted
    c, ledger = _compactable(uninterrupted, tmp_path)
    model, adapter, fp = _base(fresh)
    before = snapshot(model)
    report = ledger.compact(model, adapter, fp)
    assert_same(model, before)
    assert report["compacted"] == 3 and report["requests"] == 3 and report["kept"] == 0
    assert report["bytes_after"] < report["bytes_before"]
    assert sorted(f.name for f in c.iterdir()) == ["compact-00003.json", "compact-00003.safetensors", "manifest.json",
                                                  "state-00003.safetensors"]
    s = Ledger.open(c).summary()
    assert (s["batches"], s["compacted"], s["requests"], s["methods"]) == (3, 3, 3, ["encore"])
    full = Ledger.open(path).total_deltas()
    assert all(torch.allclose(Ledger.open(c).total_deltas()[l], full[l], rtol=0, atol=1e-6) for l in full)

    loaded = fresh("llama")
    ed = lmedit.Editor.load(loaded, tokenizer, c, covariances=spd_covariances(loaded, [1, 2]))
    assert_same(loaded, weights)
    assert ed.n_earlier == 3 and len(ed.earlier_facts) == 3
    assert all(torch.equal(ed.earlier[l], earlier[l]) for l in earlier)
    plain = fresh("llama")
    ref_path, _ = _compactable(uninterrupted, tmp_path, "ref")  # the same ledger, not compacted
    ref = lmedit.Editor.load(plain, tokenizer, ref_path, covariances=spd_covariances(plain, [1, 2]))
    ed.edit(REQUESTS)
    ref.edit(REQUESTS)
    assert_same(loaded, snapshot(plain))
    assert ed.ledger.batches[-1]["index"] == 4 and ed.ledger.n_batches == 4 and ed.ledger.n_compacted == 3
    again = fresh("llama")
    lmedit.Editor.load(again, tokenizer, c, covariances=spd_covariances(again, [1, 2]))
    assert_same(again, snapshot(plain))


def test_compacting_all_but_the_last_keeps_them_undoable(uninterrupted, fresh, tokenizer, tmp_path, capsys, monkeypatch):
    from lmedit.cli import main
    monkeypatch.setenv("LMEDIT_NUM_THREADS", str(torch.get_num_threads()))  # main() sets torch's threads

    path, weights, earlier = uninterrupted
    c, ledger = _compactable(uninterrupted, tmp_path)
    model, adapter, fp = _base(fresh)
    assert ledger.compact(model, adapter, fp, keep_last=1)["compacted"] == 2
    assert [b["index"] for b in Ledger.open(c).batches] == [2, 3]
    loaded = fresh("llama")
    lmedit.Editor.load(loaded, tokenizer, c, covariances=spd_covariances(loaded, [1, 2]))
    assert_same(loaded, weights)
    assert json.loads((c / "manifest.json").read_text())["version"] == 2  # an older lmedit refuses it
    # compacting again folds the compacted entry and the last batch into one; a file a killed process
    # left behind goes too, anything not the ledger's own stays
    (c / "batch-00001.json").write_text("[]")
    (c / "notes.txt").write_text("mine")
    assert Ledger.open(c).compact(model, adapter, fp)["compacted"] == 3
    assert not (c / "batch-00001.json").exists() and (c / "notes.txt").read_text() == "mine"
    (c / "notes.txt").unlink()
    assert [b["index"] for b in Ledger.open(c).batches] == [3]
    assert [b["index"] for b in Ledger.open(c).batches[0]["compacted"]] == [1, 2, 3]
    loaded = fresh("llama")
    lmedit.Editor.load(loaded, tokenizer, c, covariances=spd_covariances(loaded, [1, 2]))
    assert_same(loaded, weights)
    # nothing is left to drop: the CLI and truncate refuse, and the files stay as they were
    files = {f.name: f.read_bytes() for f in c.iterdir()}
    assert main(["ledger", "undo", str(c)]) == 2
    assert "holds 0 batch(es) after the 3 compacted ones" in capsys.readouterr().err
    with pytest.raises(CacheError, match="compacted into one total and can no longer be dropped"):
        Ledger.open(c).truncate(0)
    assert {f.name: f.read_bytes() for f in c.iterdir()} == files

    # with the last batch kept, it can still be dropped, and what is left is the first two batches
    d, ledger = _compactable(uninterrupted, tmp_path, "d")
    ledger.compact(model, adapter, fp, keep_last=1)
    assert main(["ledger", "undo", str(d), "--batches", "2"]) == 2
    assert "--batches must be 1..1" in capsys.readouterr().err
    assert main(["ledger", "undo", str(d), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["batches"] == 2
    two = fresh("llama")
    ed = _editor(two, tokenizer, keep_history=False)
    for b in BATCHES[:2]:
        ed.edit(b)
    loaded = fresh("llama")
    lmedit.Editor.load(loaded, tokenizer, d, covariances=spd_covariances(loaded, [1, 2]))
    assert_same(loaded, snapshot(two))


def test_compacting_refuses_what_it_cannot_do_exactly_and_changes_nothing(uninterrupted, fresh, tokenizer, tmp_path):
    c, ledger = _compactable(uninterrupted, tmp_path)
    files = {f.name: f.read_bytes() for f in c.iterdir()}
    model, adapter, fp = _base(fresh, seed=1)
    with pytest.raises(CacheError, match="was written for model|differ from the ledger's base model"):
        ledger.compact(model, adapter, fp)
    model, adapter, fp = _base(fresh)
    before = snapshot(model)
    for keep in (2, 3, -1, True):
        with pytest.raises(CacheError, match="nothing to compact|keep_last must be"):
            Ledger.open(c).compact(model, adapter, fp, keep_last=keep)
    with open(c / "batch-00002.safetensors", "r+b") as f:
        f.seek(-8, 2)
        f.write(b"corrupt!")
    files["batch-00002.safetensors"] = (c / "batch-00002.safetensors").read_bytes()
    with pytest.raises(CacheError, match="batch-00002.safetensors fails its sha256"):
        Ledger.open(c).compact(model, adapter, fp)
    assert {f.name: f.read_bytes() for f in c.iterdir()} == files
    assert_same(model, before)


def test_a_ledger_changed_by_another_writer_is_not_appended_to(uninterrupted, fresh, tokenizer, tmp_path):
    """An Editor whose ledger another process compacted (or appended to) since it opened it refuses
    its next edit, with the weights rolled back and the ledger as the other writer left it."""
    c, _ = _compactable(uninterrupted, tmp_path)
    model = fresh("llama")
    ed = lmedit.Editor.load(model, tokenizer, c, covariances=spd_covariances(model, [1, 2]))
    before = snapshot(model)
    base, adapter, fp = _base(fresh)
    Ledger.open(c).compact(base, adapter, fp)
    files = {f.name: f.read_bytes() for f in c.iterdir()}
    with pytest.raises(CacheError, match="changed by another writer"):
        ed.edit(REQUESTS)
    assert_same(model, before)
    assert {f.name: f.read_bytes() for f in c.iterdir()} == files


def test_cli_compact_and_a_resume_with_refreshed_keys(fresh, tokenizer, tmp_path, monkeypatch, capsys):
    """`lmedit ledger compact DIR`: refresh_earlier_keys after a reload reads the folded batches'
    facts again from the compacted requests, so resuming still equals the uninterrupted run."""
    from lmedit.cli import main
    monkeypatch.setenv("LMEDIT_NUM_THREADS", str(torch.get_num_threads()))  # main() sets torch's threads

    whole = fresh("llama")
    ed = _editor(whole, tokenizer, ledger=tmp_path / "whole", keep_history=False, refresh_earlier_keys=True)
    for b in BATCHES:
        ed.edit(b)
    part = _editor(fresh("llama"), tokenizer, ledger=tmp_path / "part", keep_history=False, refresh_earlier_keys=True)
    for b in BATCHES[:2]:
        part.edit(b)
    monkeypatch.setattr(lmedit, "load_model", lambda name=None, **kw: (fresh("llama"), tokenizer))
    assert main(["ledger", "compact", str(tmp_path / "part"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["compacted"], report["requests"], report["kept"]) == (2, 2, 0)
    assert main(["ledger", "show", str(tmp_path / "part")]) == 0
    assert "2 batches, 2 requests" in (out := capsys.readouterr().out) and "first 2 batches compacted" in out
    model = fresh("llama")
    again = lmedit.Editor.load(model, tokenizer, tmp_path / "part", covariances=spd_covariances(model, [1, 2]))
    assert [(f.prompt, f.subject) for f in again.earlier_facts] == [(r.prompt, r.subject) for b in BATCHES[:2] for r in b]
    again.edit(BATCHES[2])
    assert_same(model, snapshot(whole))
    assert all(torch.equal(again.earlier[l], ed.earlier[l]) for l in ed.earlier)


AGAIN = [lmedit.EditRequest(REQUESTS[0].prompt, REQUESTS[0].subject, "Lyon", "Paris")]  # the first fact, a new answer
SAME_KEY = [lmedit.EditRequest(REQUESTS[1].prompt + " and whose hobby is", REQUESTS[1].subject, "chess",
                               "golf")]  # the same text before the subject: the same key, another fact


def test_an_edit_of_the_same_key_supersedes_the_earlier_one(fresh, tokenizer):
    """supersede_edits: the earlier fact's stored key leaves the preserved set, so the new edit solves
    as if that fact had never been preserved (the same update as an Editor that never preserved it);
    with supersede_edits=False the old key pulls the update back; undo puts the old key back."""
    def run(first_preserved: bool, **kw):
        ed = _editor(fresh("llama"), tokenizer, **kw)
        ed.edit(BATCHES[0], preserve_edits=first_preserved)
        return ed, ed.edit(AGAIN)

    (ed, res), (ref, want), (old, kept) = run(True), run(False), run(True, supersede_edits=False)
    assert [(i, f.subject) for i, f in res.superseded] == [(0, "Xanadu")] and not kept.superseded
    assert ed.n_earlier == 1 and old.n_earlier == 2
    for l in (1, 2):
        assert torch.allclose(ed.earlier[l], ref.earlier[l], rtol=0, atol=1e-9 * float(ref.earlier[l].abs().max()))
        assert torch.allclose(res.deltas[l], want.deltas[l], rtol=1e-5, atol=1e-7)
        assert not torch.allclose(kept.deltas[l], want.deltas[l], rtol=1e-3, atol=1e-5)

    # with another fact between: the superseded one leaves its place, and undo puts it back there
    ed = _editor(fresh("llama"), tokenizer)
    ed.edit(BATCHES[0])
    ed.edit(OTHER)
    before = {l: e.clone() for l, e in ed.earlier.items()}
    first = ed.history[0].keys
    res = ed.edit(AGAIN)
    assert [f.subject for f in ed.earlier_facts] == ["Leonardo", "Xanadu"] and ed.n_earlier == 2
    assert ed.earlier_facts[-1] == type(ed.earlier_facts[-1])(AGAIN[0].prompt, "Xanadu", 1.0, res.batch_id, 0)
    for l in (1, 2):
        k0, k1 = first[l].double(), res.keys[l].double()
        assert torch.allclose(ed.earlier[l], before[l] - k0.T @ k0 + k1.T @ k1, rtol=0,
                              atol=1e-9 * float(before[l].abs().max()))
    ed.undo()
    assert [f.subject for f in ed.earlier_facts] == ["Xanadu", "Leonardo"] and ed.n_earlier == 2
    assert all(torch.allclose(ed.earlier[l], before[l], rtol=0, atol=1e-9 * float(before[l].abs().max()))
               for l in (1, 2))
    # another fact read from the same key (the same subject after the same text) is another fact: without
    # share_key_targets it stays (with it, it is carried: test_an_earlier_fact_of_the_key_is_carried...)
    ed = _editor(fresh("llama"), tokenizer, share_key_targets=False)
    ed.edit(REQUESTS)
    assert not ed.edit(SAME_KEY).superseded and ed.n_earlier == 3


def test_an_earlier_fact_of_the_key_is_carried_into_the_new_edit(fresh, tokenizer, tmp_path, caplog):
    """share_key_targets: a new fact of an earlier edited fact's key edits that fact again with it (one
    target vector for both, the earlier key superseded): the same edit as asking both explicitly; it
    travels with the ledger (a reload carries it again), and undo puts the earlier fact back."""
    model, twin = fresh("llama"), fresh("llama")
    ed = _editor(model, tokenizer, ledger=tmp_path / "l")
    ref = _editor(twin, tokenizer, share_key_targets=True)
    for e in (ed, ref):
        e.edit(REQUESTS)
    res = ed.edit(SAME_KEY)
    want = ref.edit(SAME_KEY + REQUESTS[1:], supersede_edits=True)  # the earlier fact asked again by hand
    assert res.carried == REQUESTS[1:] and res.requests == SAME_KEY + REQUESTS[1:]
    assert [f.subject for _, f in res.superseded] == ["Lionel Messi"] == [f.subject for _, f in want.superseded]
    assert res.targets.provenance["shared_keys"] == [[0, 1]] and torch.equal(res.targets.targets[0], res.targets.targets[1])
    assert_same(model, snapshot(twin))
    assert [f.prompt for f in ed.earlier_facts] == [REQUESTS[0].prompt, SAME_KEY[0].prompt, REQUESTS[1].prompt]
    entry = Ledger.open(tmp_path / "l").batches[-1]
    assert entry["carried"] == 1 and entry["n_requests"] == 2 and entry["superseded"] == [[1, 1]]
    assert Ledger.open(tmp_path / "l").summary()["carried"] == 1
    assert Ledger.open(tmp_path / "l").n_requests == 4 and Ledger.open(tmp_path / "l").n_asked == 3
    # a reload knows both facts of the key: a third fact of it carries the two
    loaded = fresh("llama")
    shutil.copytree(tmp_path / "l", tmp_path / "copy")  # (``ed`` goes on writing the original)
    again = lmedit.Editor.load(loaded, tokenizer, tmp_path / "copy", covariances=spd_covariances(loaded, [1, 2]))
    third = [lmedit.EditRequest(REQUESTS[1].prompt + " and whose pet is a", REQUESTS[1].subject, "cat", "dog")]
    res3 = again.edit(third)
    assert [r.prompt for r in res3.carried] == [SAME_KEY[0].prompt, REQUESTS[1].prompt]
    assert res3.targets.provenance["shared_keys"] == [[0, 1, 2]]
    # undo puts the earlier facts (and their keys) back
    before = {l: e.clone() for l, e in ed.earlier.items()}
    facts = list(ed.earlier_facts)
    res_b = ed.edit(third)
    assert len(res_b.carried) == 2
    ed.undo()
    assert ed.earlier_facts == facts
    assert all(torch.allclose(ed.earlier[l], before[l], rtol=0, atol=1e-9 * float(before[l].abs().max())) for l in before)
    # the edit's own vectors (those of the carried facts too) are reused after its undo, carrying again
    undone = snapshot(model)
    with caplog.at_level("WARNING", logger="lmedit.editor"):
        reused = ed.edit(third, targets=res_b.targets)
    assert len(reused.carried) == 2 and "computed without them" not in caplog.text
    for l in reused.deltas:
        assert torch.equal(reused.deltas[l], res_b.deltas[l])
    ed.undo()
    assert_same(model, undone)
    # given targets were computed without the earlier fact: it is not carried, with a warning
    tr = ed.compute_targets(third)
    with caplog.at_level("WARNING", logger="lmedit.editor"):
        res4 = ed.edit(third, targets=tr)
    assert "computed without them" in caplog.text and not res4.carried
    # a sequential method, or the option off, carries nothing
    off = _editor(fresh("llama"), tokenizer, share_key_targets=False)
    off.edit(REQUESTS)
    assert not off.edit(SAME_KEY).carried


def test_superseding_without_a_kept_key_warns_and_keeps_it(fresh, tokenizer, caplog):
    model = fresh("llama")
    ed = _editor(model, tokenizer, keep_history=False)
    ed.edit(BATCHES[0])
    with caplog.at_level("WARNING", logger="lmedit.editor"):
        res = ed.edit(AGAIN)
    assert "is not kept" in caplog.text and not res.superseded and ed.n_earlier == 2
    # keys read again (refresh_earlier_keys) need no stored key: the fact leaves the facts read
    model = fresh("llama")
    ed = _editor(model, tokenizer, keep_history=False, refresh_earlier_keys=True)
    ed.edit(BATCHES[0])
    res = ed.edit(AGAIN)
    assert len(res.superseded) == 1 and [f.prompt for f in ed.earlier_facts] == [AGAIN[0].prompt]
    for l in (1, 2):  # the sum holds the new key alone: the superseded one, never kept, left with its fact
        k = res.keys[l].double()
        assert torch.allclose(ed.earlier[l], k.T @ k, rtol=0, atol=1e-9 * float((k.T @ k).abs().max()))


def test_superseding_travels_with_the_ledger_through_undo_and_compaction(fresh, tokenizer, tmp_path):
    """The batch records which earlier facts it superseded: a reload equals the live Editor bit for bit,
    `ledger undo` puts their keys back, and after compaction their keys are read from the compacted file."""
    model = fresh("llama")
    ed = _editor(model, tokenizer, ledger=tmp_path / "l", keep_history=False)
    for b in (*BATCHES, AGAIN):
        ed.edit(b)
    assert Ledger.open(tmp_path / "l").batches[-1]["superseded"] == [[1, 0]]
    loaded = fresh("llama")
    again = lmedit.Editor.load(loaded, tokenizer, tmp_path / "l", covariances=spd_covariances(loaded, [1, 2]))
    assert again.earlier_facts == ed.earlier_facts and again.n_earlier == ed.n_earlier == 3
    assert all(torch.equal(again.earlier[l], ed.earlier[l]) for l in ed.earlier)
    # the same three batches, compacted, then the re-edit: the key comes from the compacted file
    model2 = fresh("llama")
    three = _editor(model2, tokenizer, ledger=tmp_path / "c", keep_history=False)
    for b in BATCHES:
        three.edit(b)
    shutil.copytree(tmp_path / "c", tmp_path / "u")
    base, adapter, fp = _base(fresh)
    Ledger.open(tmp_path / "c").compact(base, adapter, fp)
    loaded = fresh("llama")
    c = lmedit.Editor.load(loaded, tokenizer, tmp_path / "c", covariances=spd_covariances(loaded, [1, 2]))
    assert len(c.edit(AGAIN).superseded) == 1
    assert_same(loaded, snapshot(model))
    assert all(torch.equal(c.earlier[l], ed.earlier[l]) for l in ed.earlier)
    # dropping the re-edit puts the superseded key back: the state of the three batches
    Ledger.open(tmp_path / "l").truncate(3)
    state = Ledger.open(tmp_path / "l").read_state()
    three_state = Ledger.open(tmp_path / "u").read_state()
    assert all(torch.allclose(state[l], three_state[l], rtol=0, atol=1e-9 * float(three_state[l].abs().max()))
               for l in three_state)
    loaded = fresh("llama")
    back = lmedit.Editor.load(loaded, tokenizer, tmp_path / "l", covariances=spd_covariances(loaded, [1, 2]))
    assert [f.subject for f in back.earlier_facts] == ["Xanadu", "Lionel Messi", "Leonardo"]


def test_ledger_cohorts_scores_every_kth_batch_before_and_after(uninterrupted, fresh, tokenizer, tmp_path, monkeypatch):
    """benchmarks/ledger_cohorts.py: batches 1, 1 + k, ... and the last, scored on the unedited model and
    with the whole ledger applied; a compacted ledger or --every 0 is refused."""
    import importlib.util
    import sys
    from pathlib import Path
    from types import SimpleNamespace

    spec = importlib.util.spec_from_file_location("cohorts", Path(__file__).parents[2] / "benchmarks" / "ledger_cohorts.py")
    cohorts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cohorts)
    assert cohorts.cohorts(SimpleNamespace(n_batches=72, n_compacted=0, path="L"), 8) == [0, 8, 16, 24, 32, 40, 48, 56, 64, 71]
    with pytest.raises(SystemExit, match="must be 1 or more"):
        cohorts.cohorts(SimpleNamespace(n_batches=3, n_compacted=0, path="L"), 0)
    with pytest.raises(SystemExit, match="is compacted"):
        cohorts.cohorts(SimpleNamespace(n_batches=3, n_compacted=2, path="L"), 1)
    path, weights, _ = uninterrupted
    model = fresh("llama")
    monkeypatch.setattr(cohorts.lmedit, "load_model", lambda name: (model, tokenizer))
    monkeypatch.setattr(sys, "argv", ["ledger_cohorts.py", str(path), "--every", "2", "--out", str(tmp_path)])
    assert cohorts.main() == 0
    assert_same(model, weights)  # scored with every batch applied
    got = json.loads((tmp_path / f"cohorts_{path.name}.json").read_text())
    assert [r["batch"] for r in got["rows"]] == [1, 3] and got["edits"] == 3
    assert [r["n"] for r in got["rows"]] == [len(BATCHES[0]), len(BATCHES[2])]
    assert [r["edits_before"] for r in got["rows"]] == [0, len(BATCHES[0]) + len(BATCHES[1])]
    for r in got["rows"]:
        assert r["efficacy_score"] > r["unedited_efficacy_score"]  # the edits hold, and the two models differ
