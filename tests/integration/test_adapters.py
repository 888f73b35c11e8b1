"""Model adapters on every tiny architecture: the adapter's W is what the edited module computes
(and a view of the stored parameter), its module paths resolve, a wrong layout is detected, an
unknown architecture is named, and a custom adapter can be registered.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import lmedit
from lmedit.core.keys import collect_keys
from lmedit.errors import UnsupportedArchitectureError
from lmedit.models.adapters import ModelAdapter, get_adapter, register_adapter, supported_model_types

from helpers import ARCHS, VARIED_REQUESTS


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
    for t in ARCHS:
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
        K = collect_keys(model, tokenizer, custom, VARIED_REQUESTS[:1], [["{}"]], [1])[1]
        assert K.shape == (1, 128) and torch.isfinite(K).all()
    finally:
        from lmedit.models import adapters

        adapters._REGISTRY.pop("my-llama-variant", None)
    with pytest.raises(ValueError, match="layout"):
        ModelAdapter("x", blocks="a", edit="b", mlp="c", final_norm="d", unembed="e", layout="transposed")
