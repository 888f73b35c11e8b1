"""Causal tracing on tiny models where the answer is known by construction: tokens before the
subject have no effect; restoring the last layer's hidden state at the last token restores the
clean probability exactly; with every MLP but one silenced, only windows holding that layer
show an MLP effect; the batched restorations equal one-at-a-time runs done by hand."""

from __future__ import annotations

import json

import pytest
import torch

import lmedit
from lmedit.tracing import Fact, _Tracer, trace

FACTS = [Fact("The capital city of the country {} is", "Xanadu"), Fact("Everyone knows that {} plays the", "Lionel Messi")]


def _run(model, tok, **kw):
    kw = {"samples": 3, "window": 1, "compute_dtype": "model", **kw}
    return trace(model, tok, FACTS, **kw)


def test_effects_known_by_construction(fresh, tokenizer):
    model = fresh("llama")
    res = _run(model, tokenizer)
    assert len(res.traces) == 2 and not res.skipped
    L = res.n_layers
    for t in res.traces:
        s0, _ = t.subject_range
        for kind in ("hidden", "mlp", "attn"):
            assert t.effects[kind].shape == (len(t.tokens), L)
            assert torch.all(t.effects[kind][:s0] == 0)  # before the subject: the noise is not seen
        # the last layer's output at the last token is what the head reads: restoring it is the clean run
        assert t.effects["hidden"][-1, L - 1] == pytest.approx(t.p_clean - t.p_corrupted, abs=1e-5)


def test_only_the_live_mlp_has_an_effect(fresh, tokenizer):
    model = fresh("llama")
    adapter = lmedit.get_adapter(model)
    with torch.no_grad():
        for l in (0, 1, 3):
            adapter.edit_module(model, l).weight.zero_()  # these MLPs output exactly 0, corrupted or not
    res = _run(model, tokenizer, kinds=("mlp",))
    for t in res.traces:
        eff = t.effects["mlp"]
        assert eff[:, [0, 1, 3]].abs().max() < 1e-6  # (batch-size rounding only)
        assert eff[t.subject_range[1]:, 2].abs().max() > 1e-6


def test_batched_restorations_equal_runs_by_hand(fresh, tokenizer):
    """One restoration recomputed by hand: the full model with noisy subject embeddings (the same
    noise draws) and the clean block output written back at one (layer, token)."""
    model = fresh("gpt2")
    adapter = lmedit.get_adapter(model)
    fact = FACTS[0]
    gen = torch.Generator().manual_seed(5)
    tracer = _Tracer(model, tokenizer, adapter, 2, 1, ("hidden",), gen)
    with torch.no_grad():
        got = tracer.trace(fact, 0.5)
    ids, (s0, s1) = tracer.encode(fact)
    emb = model.get_input_embeddings()(ids[None])
    noise = torch.randn(2, s1 - s0 + 1, emb.shape[-1], generator=torch.Generator().manual_seed(5)) * 0.5
    layer, pos = 1, s1
    with torch.no_grad():
        clean_h = model(inputs_embeds=emb, output_hidden_states=True).hidden_states[layer + 1][0, pos]
        probs = []
        for s in range(2):
            e = emb.clone()
            e[0, s0:s1 + 1] += noise[s]

            def put(module, args, output):
                h = output[0] if isinstance(output, tuple) else output
                h = h.clone()
                h[0, pos] = clean_h
                return (h, *output[1:]) if isinstance(output, tuple) else h
            handle = adapter.block(model, layer).register_forward_hook(put)
            try:
                logits = model(inputs_embeds=e).logits[0, -1]
            finally:
                handle.remove()
            probs.append(torch.softmax(logits.float(), -1))
        clean_logits = model(inputs_embeds=emb).logits[0, -1]
        a = int(clean_logits.argmax())
        p = torch.stack([q[a] for q in probs]).mean()
    assert got.effects["hidden"][pos, layer] == pytest.approx(float(p) - got.p_corrupted, abs=1e-5)


def test_summary_plots_and_cli(fresh, tokenizer, tmp_path, monkeypatch, capsys):
    model = fresh("llama")
    res = _run(model, tokenizer)
    out = res.save(tmp_path / "tr")
    summary = json.loads((out / "trace.json").read_text())
    assert len(summary["mlp_effect_at_last_subject_token"]) == res.n_layers
    assert len(summary["suggested_layers"]) == min(5, res.n_layers)
    assert all((out / f"trace_{k}.png").stat().st_size > 1000 for k in ("hidden", "mlp", "attn"))
    # the command line, on the same tiny model saved to disk
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    data = tmp_path / "facts.json"
    data.write_text(json.dumps([{"prompt": f.prompt, "subject": f.subject} for f in FACTS]))
    from lmedit.cli import main

    threads = torch.get_num_threads()
    try:
        assert main(["trace", "--model", str(tmp_path / "m"), "--data", str(data), "--samples", "3", "--window", "1",
                     "--out", str(tmp_path / "cli"), "--json", "--quiet", "--dtype-compute", "model"]) == 0
    finally:
        torch.set_num_threads(threads)
    printed = json.loads(capsys.readouterr().out)
    assert printed["facts"] == 2
    assert printed["mlp_effect_at_last_subject_token"] == pytest.approx(summary["mlp_effect_at_last_subject_token"], abs=1e-6)


def test_unknown_facts_are_skipped_with_the_reason(fresh, tokenizer):
    model = fresh("llama")
    res = trace(model, tokenizer, [Fact("The capital of {} is", "France", answer="zzzz-not-predicted")], samples=2,
                window=1, compute_dtype="model")
    assert not res.traces and "predicts" in res.skipped[0]["why"]


def test_last_subject_positions_trace_that_row_alone(fresh, tokenizer, tmp_path):
    """positions="last_subject" gives the last-subject row of the full trace (same noise draws), and
    marks every other position untraced: left out of the averages, None in the JSON, blank in plots."""
    model = fresh("llama")
    full = _run(model, tokenizer)
    row = _run(model, tokenizer, positions="last_subject")
    for a, b in zip(full.traces, row.traces):
        s1 = a.subject_range[1]
        for kind in ("hidden", "mlp", "attn"):
            torch.testing.assert_close(b.effects[kind][s1], a.effects[kind][s1], rtol=1e-4, atol=1e-5)
            others = [i for i in range(len(b.tokens)) if i != s1]
            assert torch.isnan(b.effects[kind][others]).all()
    assert row.suggested_layers() == full.suggested_layers()
    assert row.mlp_at_last_subject() == pytest.approx(full.mlp_at_last_subject(), abs=1e-5)
    cats = row.by_category("mlp")
    assert torch.isfinite(cats[2]).all() and torch.isnan(cats[[0, 5]]).all()
    out = row.save(tmp_path / "row")
    summary = json.loads((out / "trace.json").read_text())
    assert summary["settings"]["positions"] == "last_subject"
    assert summary["by_category"]["mlp"][0] == [None] * row.n_layers
    assert (out / "trace_mlp.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="positions"):
        _run(model, tokenizer, positions="first")
