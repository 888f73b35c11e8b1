"""Models dispatched with accelerate: blocks offloaded to CPU memory or to disk edit with the same
deltas as the plain model, the edit persists (the offload hooks reload the edited weights), undo
restores the originals, and statistics read through the hooks."""

from __future__ import annotations

import copy

import pytest
import torch

import lmedit
from lmedit.core.stats import second_moments
from lmedit.models.adapters import get_adapter
from lmedit.models.offload import is_offloaded, read_param

from helpers import edit_kwargs, layers_for

pytest.importorskip("accelerate")

LAYERS = [1, 2]
REQUESTS = [
    lmedit.EditRequest(prompt="The capital of {} is", subject="Xanadu", target_new="Paris", target_true="Rome"),
    lmedit.EditRequest(prompt="{} plays the", subject="Lionel Messi", target_new="piano", target_true="football"),
]


def _dispatch(model, offload_dir, where: dict[int, str]):
    """Blocks 0..3 on "cpu", or offloaded ("disk" / "cpu-offload": kept in memory, loaded per forward)."""
    from accelerate import cpu_offload_with_hook, dispatch_model  # noqa: F401 (cpu_offload below)
    from accelerate.hooks import attach_align_device_hook

    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    for i in range(4):
        device_map[f"model.layers.{i}"] = "disk" if where.get(i) == "disk" else "cpu"
    model = dispatch_model(model, device_map=device_map, offload_dir=str(offload_dir))
    for i, kind in where.items():
        if kind == "cpu-offload":  # accelerate's CPU offload: weights held in a CPU state dict, loaded per forward
            block = model.model.layers[i]
            sd = {f"{n}": p.detach().clone() for n, p in block.named_parameters()}
            attach_align_device_hook(block, execution_device=torch.device("cpu"), offload=True, weights_map=sd)
    return model


@pytest.mark.parametrize("method", ["emmet", "memit", "rome"])
def test_offloaded_blocks_edit_like_the_plain_model(make_tiny, tokenizer, covariances, tmp_path, method):
    plain = make_tiny("llama", seed=7)
    layers = layers_for(method)
    C = covariances(plain, layers)
    twin = copy.deepcopy(plain)
    ref = lmedit.edit(plain, tokenizer, REQUESTS, method=method, covariances=C, **edit_kwargs(method))

    model = _dispatch(twin, tmp_path / "offload", {1: "disk", 2: "cpu-offload"})
    adapter = get_adapter(model)
    assert is_offloaded(adapter.edit_module(model, 1)) and is_offloaded(adapter.edit_module(model, 2))
    before = {l: read_param(adapter.edit_module(model, l)).clone() for l in layers}
    res = lmedit.edit(model, tokenizer, REQUESTS, method=method, covariances=C, **edit_kwargs(method))
    assert sorted(res.deltas) == layers
    for l in layers:
        rel = float((res.deltas[l] - ref.deltas[l]).norm() / ref.deltas[l].norm())
        assert rel < 1e-5, (l, rel)
        # the edit persists where the hooks read it, and the module is still offloaded
        assert adapter.edit_module(model, l).weight.device.type == "meta"
        assert torch.equal(adapter.stored(model, l), adapter.stored(plain, l))
    ids = tokenizer("The capital of Xanadu is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)
    res.undo()
    for l in layers:
        assert torch.equal(read_param(adapter.edit_module(model, l)), before[l])


def test_statistics_through_offload_hooks(make_tiny, tokenizer, tmp_path):
    plain = make_tiny("llama", seed=8)
    kw = dict(corpus="wikipedia-excerpt", n_samples=8, max_length=32, max_tokens=96, progress=False)
    ref = second_moments(plain, tokenizer, get_adapter(plain), LAYERS, cache_dir=tmp_path / "a", **kw)
    model = _dispatch(copy.deepcopy(plain), tmp_path / "offload", {1: "disk", 2: "disk"})
    got = second_moments(model, tokenizer, get_adapter(model), LAYERS, cache_dir=tmp_path / "b", **kw)
    for l in LAYERS:
        assert torch.equal(got[l], ref[l])
    # one fingerprint for the model however it is stored (the statistics cache key)
    assert lmedit.models.loading.fingerprint(model) == lmedit.models.loading.fingerprint(plain)


def test_target_files_recognise_offloaded_weights(make_tiny, tokenizer, covariances, tmp_path):
    """The weights digest reads offloaded weights through the hooks: targets saved from the plain
    model load into an Editor of its offloaded twin, and are refused there once it is edited."""
    plain = make_tiny("llama", seed=7)
    C = covariances(plain, LAYERS)
    twin = _dispatch(copy.deepcopy(plain), tmp_path / "offload", {1: "disk", 2: "cpu-offload"})
    kw = {**edit_kwargs("emmet"), "layers": LAYERS}
    mine = lmedit.Editor(plain, tokenizer, "emmet", covariances=C, **kw)
    path = mine.save_targets(mine.compute_targets(REQUESTS), tmp_path / "t.safetensors")
    theirs = lmedit.Editor(twin, tokenizer, "emmet", covariances=C, **kw)
    loaded = theirs.load_targets(path)
    theirs.edit(REQUESTS, targets=loaded)
    with pytest.raises(lmedit.CacheError, match="other weights"):
        theirs.load_targets(path)
