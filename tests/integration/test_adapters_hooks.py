"""Adapters, hooks, subject positions and the target fast path, on every tiny architecture.

Each check compares lmedit's view of a model with the model itself: the adapter's W against
what the edited module computes, Trace's captures against a hook of our own, the fast target
loss (KV-cache prefix, truncated blocks) against plain full forward passes.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import lmedit
from lmedit.core.keys import collect_keys, residual_stream
from lmedit.core.targets import TargetConfig, compute_targets
from lmedit.core.tokens import encode_subject_prompts
from lmedit.errors import UnsupportedArchitectureError
from lmedit.hooks import AddAtPositions, Trace, count_hooks
from lmedit.models.adapters import ModelAdapter, get_adapter, register_adapter, supported_model_types

REQUESTS = [
    lmedit.EditRequest("The capital of {} is", "Xanadu", "Paris", "Rome"),
    lmedit.EditRequest("{} plays the", "Lionel Messi", "piano keyboard"),
    lmedit.EditRequest("As everyone who has been there knows, the food of {}", "Italy", "is terrible"),
]


def _ids(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt")["input_ids"]


class _Recorder:
    """A forward hook of our own: records (input, output) of a module."""

    def __init__(self, module):
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        self.calls.append((args[0].detach().clone() if args else None, out.detach().clone()))

    def remove(self):
        self.handle.remove()


# --- adapters -----------------------------------------------------------------------------------

def test_adapter_weight_is_what_the_module_computes(tiny_model):
    model, _ = tiny_model
    adapter = get_adapter(model)
    adapter.check(model)
    assert adapter.model_type == model.config.model_type
    assert adapter.n_layers(model) == 4
    g = torch.Generator().manual_seed(0)
    for layer in range(4):
        mod = adapter.edit_module(model, layer)
        W = adapter.weight(model, layer)  # (d_out, d_in)
        d_out, d_in = W.shape
        assert d_out == 64 and d_in in (128, 256)  # the MLP's hidden width is the key dimension
        x = torch.randn(3, 5, d_in, generator=g)
        with torch.no_grad():
            out = mod(x)
        bias = getattr(mod, "bias", None)
        expect = x @ W.T + (bias if bias is not None else 0)
        torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)
        # the parameter name the adapter reports is the parameter it edits
        assert dict(model.named_parameters())[adapter.edit_param_name(layer)] is mod.weight


def test_adapter_weight_is_a_view_of_the_parameter(tiny_model):
    """WeightTransaction writes through ``adapter.weight``: it must alias the stored tensor."""
    model, _ = tiny_model
    adapter = get_adapter(model)
    mod = adapter.edit_module(model, 1)
    W = adapter.weight(model, 1)
    x = torch.randn(2, W.shape[1])
    with torch.no_grad():
        before = mod(x)
        dW = torch.zeros_like(W)
        dW[0, :] = 1.0  # only output feature 0 changes
        W.add_(dW)
        after = mod(x)
        W.sub_(dW)
    torch.testing.assert_close(after[:, 0] - before[:, 0], x.sum(1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(after[:, 1:], before[:, 1:])


def test_adapter_paths_resolve(tiny_model):
    model, _ = tiny_model
    adapter = get_adapter(model)
    assert adapter.unembed_module(model) is model.get_output_embeddings()
    blocks = adapter.block_list(model)
    assert isinstance(blocks, torch.nn.ModuleList) and len(blocks) == 4
    assert adapter.mlp_module(model, 2) is adapter.block(model, 2).get_submodule(adapter.mlp)
    with pytest.raises(IndexError, match="out of range"):
        adapter.block(model, 4)


def test_wrong_layout_is_detected(make_tiny):
    model = make_tiny("llama")
    good = get_adapter(model)
    bad = dataclasses.replace(good, layout="in_out")
    with pytest.raises(ValueError, match="layout"):
        bad.check(model)
    gpt2 = make_tiny("gpt2")
    with pytest.raises(ValueError, match="layout"):
        dataclasses.replace(get_adapter(gpt2), layout="out_in").check(gpt2)


def test_unknown_architecture_names_it_and_says_how_to_register():
    with pytest.raises(UnsupportedArchitectureError) as e:
        get_adapter("nonexistent")
    msg = str(e.value)
    assert "'nonexistent'" in msg
    for t in ("gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2"):
        assert t in msg
    assert "register_adapter" in msg
    assert isinstance(e.value, KeyError) and isinstance(e.value, lmedit.LmeditError)
    with pytest.raises(UnsupportedArchitectureError, match="config.model_type"):
        get_adapter(torch.nn.Linear(2, 2))


def test_register_a_custom_adapter(make_tiny, tokenizer):
    model = make_tiny("llama")
    model.config.model_type = "my-llama-variant"
    with pytest.raises(UnsupportedArchitectureError, match="my-llama-variant"):
        get_adapter(model)
    custom = ModelAdapter("my-llama-variant", blocks="model.layers", edit="mlp.down_proj", mlp="mlp",
                          final_norm="model.norm", unembed="lm_head", layout="out_in")
    try:
        assert register_adapter(custom) is custom
        assert "my-llama-variant" in supported_model_types()
        assert get_adapter(model) is custom
        custom.check(model)
        with pytest.raises(ValueError, match="overwrite=True"):
            register_adapter(custom)
        assert register_adapter(custom, overwrite=True) is custom
        # and the registered adapter drives key collection
        K = collect_keys(model, tokenizer, custom, REQUESTS[:1], [["{}"]], [1])[1]
        assert K.shape == (1, 128) and torch.isfinite(K).all()
    finally:
        from lmedit.models import adapters

        adapters._REGISTRY.pop("my-llama-variant", None)
    with pytest.raises(ValueError, match="layout"):
        ModelAdapter("x", blocks="a", edit="b", mlp="c", final_norm="d", unembed="e", layout="transposed")


# --- hooks --------------------------------------------------------------------------------------

def test_trace_captures_the_modules_actual_input_and_output(tiny_model):
    model, tok = tiny_model
    adapter = get_adapter(model)
    ids = _ids(tok, "The capital of Xanadu is Paris")
    mods = {"k1": adapter.edit_module(model, 1), "b2": adapter.block(model, 2)}
    mine = {k: _Recorder(m) for k, m in mods.items()}
    try:
        with torch.no_grad(), Trace(mods, capture="both") as tr:
            full = model(ids).logits
    finally:
        for r in mine.values():
            r.remove()
    for k in mods:
        (x, y), = mine[k].calls
        torch.testing.assert_close(tr.inputs[k], x, rtol=0, atol=0)
        torch.testing.assert_close(tr.outputs[k], y, rtol=0, atol=0)
    # the captured key through W gives the captured value
    W, b = adapter.weight(model, 1), getattr(mods["k1"], "bias", None)
    torch.testing.assert_close(tr.outputs["k1"], tr.inputs["k1"] @ W.T + (0 if b is None else b), rtol=1e-5, atol=1e-5)
    # positions keep one token per row
    pos = torch.tensor([3])
    with torch.no_grad(), Trace(mods, capture="both", positions=pos) as tr2:
        model(ids)
    torch.testing.assert_close(tr2.inputs["k1"], tr.inputs["k1"][:, 3])
    torch.testing.assert_close(tr2.outputs["b2"], tr.outputs["b2"][:, 3])
    assert full.shape[-1] == 49152
    assert count_hooks(model) == 0


def test_trace_stop_gives_the_same_activations_and_stops(tiny_model):
    model, tok = tiny_model
    adapter = get_adapter(model)
    ids = _ids(tok, "Some text about the weather in Xanadu")
    mods = {"k0": adapter.edit_module(model, 0), "z1": adapter.block(model, 1)}
    with torch.no_grad(), Trace(mods, capture="both") as full:
        model(ids)
    later = _Recorder(adapter.block(model, 2))
    head = _Recorder(model.get_output_embeddings())
    try:
        ret = "not reached"
        with torch.no_grad(), Trace(mods, capture="both", stop=True) as stopped:
            ret = model(ids)
        assert ret == "not reached"  # the pass ended inside the with block
    finally:
        later.remove()
        head.remove()
    assert later.calls == [] and head.calls == []  # nothing after block 1 ran
    for k in mods:
        torch.testing.assert_close(stopped.inputs[k], full.inputs[k], rtol=0, atol=0)
        torch.testing.assert_close(stopped.outputs[k], full.outputs[k], rtol=0, atol=0)
    assert count_hooks(model) == 0


def test_no_hooks_left_after_an_exception(tiny_model):
    model, tok = tiny_model
    adapter = get_adapter(model)
    ids = _ids(tok, "Hello there")
    assert count_hooks(model) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with Trace({"z": adapter.block(model, 1)}, capture="both"):
            assert count_hooks(model) == 2
            model(ids)
            raise RuntimeError("boom")
    assert count_hooks(model) == 0
    delta = torch.ones(1, 64)
    with pytest.raises(KeyboardInterrupt):
        with AddAtPositions(adapter.block(model, 1), delta, torch.tensor([0])):
            assert count_hooks(model) == 1
            raise KeyboardInterrupt
    assert count_hooks(model) == 0
    # an exception raised by the model inside a traced pass (wrong input) also leaves nothing
    with pytest.raises(Exception):
        with Trace({"z": adapter.block(model, 1)}, stop=True):
            model(torch.tensor([[10**9]]))
    assert count_hooks(model) == 0


@pytest.mark.parametrize("layer", [1, 3])
def test_add_at_positions_changes_only_the_chosen_position_and_later(tiny_model, layer):
    model, tok = tiny_model
    adapter = get_adapter(model)
    ids = torch.cat([_ids(tok, "The capital of Xanadu is a lovely city")[:, :8],
                     _ids(tok, "I like to eat apples in the sun")[:, :8]])
    pos = torch.tensor([3, 5])
    g = torch.Generator().manual_seed(1)
    delta = 5 * torch.randn(2, 64, generator=g)
    with torch.no_grad():
        base = model(ids).logits
        with Trace({"z": adapter.block(model, layer)}) as t0:
            model(ids)
        with AddAtPositions(adapter.block(model, layer), delta, pos):
            with Trace({"z": adapter.block(model, layer)}) as t1:
                edited = model(ids).logits
    assert count_hooks(model) == 0
    # the traced block output (a hook registered after AddAtPositions sees the edited output) moved by delta at pos
    moved = t1.outputs["z"] - t0.outputs["z"]
    for i in range(2):
        p = int(pos[i])
        torch.testing.assert_close(moved[i, p], delta[i], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(moved[i, :p], torch.zeros(p, 64), rtol=0, atol=0)
        # logits: before p exactly the same, at p different
        torch.testing.assert_close(edited[i, :p], base[i, :p], rtol=0, atol=0)
        assert (edited[i, p] - base[i, p]).abs().max() > 1e-3
        if layer < 3:  # later blocks' attention carries the change forward
            assert (edited[i, p + 1:] - base[i, p + 1:]).abs().max() > 1e-6


def test_add_at_positions_passes_gradients_to_delta(make_tiny, tokenizer):
    model = make_tiny("llama")
    adapter = get_adapter(model)
    ids = _ids(tokenizer, "The capital of Xanadu is")
    delta = torch.zeros(1, 64, requires_grad=True)
    with AddAtPositions(adapter.block(model, 1), delta, torch.tensor([2])):
        model(ids).logits[0, -1, 100].backward()
    assert delta.grad is not None and delta.grad.abs().sum() > 0


# --- subject positions with the real tokenizer ---------------------------------------------------

@pytest.mark.parametrize("template,subject", [
    ("{} is a city in", "Xanadu"),                         # start
    ("The capital of {} is", "Xanadu"),                    # middle
    ("The mother tongue of {} is", "Danielle Darrieux"),   # middle, several tokens
    ("I was born in {}", "San Francisco"),                  # end
    ("{}", "Lionel Messi"),                                 # the whole prompt
    ("Facts about {}'s history", "Ancient Rome"),           # followed by punctuation
    ("The lyrics of {} are", "  Über Straße"),              # non-ASCII, leading spaces
])
def test_subject_last_token_ends_the_subject(tokenizer, template, subject):
    seq, = encode_subject_prompts(tokenizer, [template], [subject])
    text = template.replace("{}", subject)
    assert seq.ids == tokenizer(text)["input_ids"]
    upto = tokenizer.decode(seq.ids[: seq.subject_last + 1])
    before = tokenizer.decode(seq.ids[: seq.subject_last])
    assert upto.rstrip().endswith(subject.strip()), (upto, subject)
    assert not before.rstrip().endswith(subject.strip())  # the last token is needed to finish the subject
    assert seq.after_subject == seq.subject_last + 1 <= len(seq.ids)


def test_subject_positions_in_a_batch_match_single_encoding(tokenizer):
    templates = ["{} is a city in", "The capital of {} is", "I was born in {}"]
    subjects = ["Xanadu", "Danielle Darrieux", "San Francisco"]
    batch = encode_subject_prompts(tokenizer, templates, subjects)
    single = [encode_subject_prompts(tokenizer, [t], [s])[0] for t, s in zip(templates, subjects)]
    assert batch == single


def test_collect_keys_equal_unpadded_module_inputs(tiny_model):
    """Keys read from a right-padded batch equal the edited module's input in a lone, unpadded pass."""
    model, tok = tiny_model
    adapter = get_adapter(model)
    K = collect_keys(model, tok, adapter, REQUESTS, [["{}"]], [1, 2])
    z = residual_stream(model, tok, adapter, REQUESTS, 2)
    for i, r in enumerate(REQUESTS):
        seq, = encode_subject_prompts(tok, [r.prompt], [r.subject])
        with torch.no_grad(), Trace({"k1": adapter.edit_module(model, 1), "k2": adapter.edit_module(model, 2),
                                     "z": adapter.block(model, 2)}, capture="both") as tr:
            model(torch.tensor([seq.ids]))
        p = seq.subject_last
        torch.testing.assert_close(K[1][i], tr.inputs["k1"][0, p], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(K[2][i], tr.inputs["k2"][0, p], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(z[i], tr.outputs["z"][0, p], rtol=1e-4, atol=1e-5)


# --- the target fast path against plain forward passes ------------------------------------------

def _naive_nll(model, tok, request, templates) -> float:
    """mean over templates of the per-token mean NLL of target_new, from full unpadded forwards."""
    text = request.text
    prompt_ids = tok(text)["input_ids"]
    joint = tok(text + " " + request.target_new)["input_ids"]
    assert joint[: len(prompt_ids)] == prompt_ids
    target = joint[len(prompt_ids):]
    per_template = []
    for t in templates:
        prefix = tok(t.replace("{}", text))["input_ids"]
        ids = torch.tensor([prefix + target])
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits[0].double(), -1)
        cols = torch.arange(len(prefix) - 1, len(prefix) - 1 + len(target))
        per_template.append(float(-lp[cols, torch.tensor(target)].mean()))
    return sum(per_template) / len(per_template)


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
        text = r.text
        prompt_ids = tokenizer(text)["input_ids"]
        target = tokenizer(text + " " + r.target_new)["input_ids"][len(prompt_ids):]
        nlls = []
        for t in TEMPLATES:
            seq, = encode_subject_prompts(tokenizer, [t.replace("{}", r.prompt)], [r.subject])
            ids = torch.tensor([seq.ids + target])
            with torch.no_grad(), AddAtPositions(adapter.block(model, 1), res.delta[i:i + 1],
                                                 torch.tensor([seq.subject_last])):
                lp = torch.log_softmax(model(ids).logits[0].double(), -1)
            cols = torch.arange(len(seq.ids) - 1, len(seq.ids) - 1 + len(target))
            nlls.append(float(-lp[cols, torch.tensor(target)].mean()))
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
