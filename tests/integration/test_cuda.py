"""On a CUDA GPU (skipped elsewhere; run by ``benchmarks/gpu_check.sh`` on a GPU machine): edits of a
model on the GPU, and of one split between the GPU and the CPU with accelerate, give the deltas of
the CPU edit (the GPU optimising targets in its own layout: one chunk, one pass a step); each
layer's float64 solve runs on the device its layer computes on; a lifelong Editor's ledger written
from the GPU loads back onto a CPU model with the same weights."""

from __future__ import annotations

import copy

import pytest
import torch

import lmedit
from lmedit.models.adapters import get_adapter

from helpers import edit_kwargs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPU = torch.device("cuda:0")
REQUESTS = [
    lmedit.EditRequest(prompt="The capital of {} is", subject="Xanadu", target_new="Paris", target_true="Rome"),
    lmedit.EditRequest(prompt="{} plays the", subject="Lionel Messi", target_new="piano", target_true="football"),
    lmedit.EditRequest(prompt="{} was developed by", subject="Windows 10", target_new="Apple", target_true="Microsoft"),
]


def _rel(a: dict, b: dict) -> float:
    return max(float((a[l].cpu() - b[l].cpu()).norm() / b[l].cpu().norm()) for l in b)


def _dispatch(model, where: str):
    """Embeddings and blocks 0-1 on the GPU, blocks 2-3 and the head on the CPU: computing there
    ("split", accelerate's main device the CPU) or offloaded, their weights streamed to the GPU for
    each forward ("offload", accelerate's default for "cpu" entries when a GPU is in the map)."""
    from accelerate import dispatch_model

    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.layers.{i}": (0 if i < 2 else "cpu") for i in range(4)})
    return dispatch_model(model, device_map=device_map, main_device="cpu" if where == "split" else None)


@pytest.mark.parametrize("method,distribution", [("emmet", "spread"), ("memit", "spread"), ("memit", "joint"),
                                                 ("alphaedit", "spread"), ("rome", "single")])
@pytest.mark.parametrize("where", ["gpu", "split", "offload"])
def test_gpu_edit_gives_the_cpu_deltas(make_tiny, tokenizer, covariances, method, distribution, where):
    cpu = make_tiny("llama", seed=3)
    C = covariances(cpu, [1, 2])
    twin = copy.deepcopy(cpu)
    kw = dict(edit_kwargs(method), distribution=distribution)
    reqs = REQUESTS[:1] if method == "rome" else REQUESTS
    ref = lmedit.Editor(cpu, tokenizer, method, covariances=C, **kw).edit(reqs)

    model = twin.to(GPU) if where == "gpu" else _dispatch(twin, where)
    editor = lmedit.Editor(model, tokenizer, method, covariances=C, **kw)
    adapter = get_adapter(model)
    systems = editor.systems(editor.hparams, editor.covariances())
    for layer, system in systems.items():  # the solve runs where the layer computes
        want = "cpu" if where == "split" and layer >= 2 else "cuda"
        assert system.C.device.type == want, (layer, system.C.device)
    before = {l: adapter.weight(model, l).detach().to("cpu", torch.float64).clone() for l in ref.deltas}
    res = editor.edit(reqs)
    assert _rel(res.deltas, ref.deltas) < 1e-3
    for l, d in res.deltas.items():  # written on the weight's own device, in its dtype
        W = adapter.weight(model, l)
        assert W.device.type == ("cuda" if where == "gpu" or l < 2 else "cpu") and W.dtype == torch.float32
        got = W.detach().to("cpu", torch.float64) - before[l]
        assert float((got - d.cpu().double()).norm() / d.norm()) < 1e-5
    res.undo()
    for l in ref.deltas:
        assert torch.equal(adapter.weight(model, l).detach().cpu().double(), before[l])


def test_lifelong_ledger_from_the_gpu_loads_on_the_cpu(make_tiny, tokenizer, covariances, tmp_path):
    base = make_tiny("llama", seed=5)
    C = covariances(base, [1, 2])
    cpu_twin = copy.deepcopy(base)
    model = base.to(GPU)
    kw = dict(edit_kwargs("memit"), preserve_edits=True)
    editor = lmedit.Editor(model, tokenizer, "memit", covariances=C, ledger=tmp_path / "ledger", **kw)
    editor.edit(REQUESTS[:2])
    editor.edit(REQUESTS[2:])
    assert all(t.device.type == "cpu" and t.dtype == torch.float64 for t in editor.earlier.values())
    loaded = lmedit.Editor.load(cpu_twin, tokenizer, tmp_path / "ledger", covariances=C)
    adapter = get_adapter(model)
    for l in (1, 2):
        a, b = adapter.weight(model, l).detach().cpu(), adapter.weight(cpu_twin, l).detach()
        assert float((a - b).norm() / a.norm()) < 1e-6
        assert torch.allclose(loaded.earlier[l], editor.earlier[l])


@pytest.mark.parametrize("where", ["gpu", "split", "offload"])
def test_the_target_layout_follows_where_the_passes_run(make_tiny, tokenizer, where):
    """On the GPU every request goes into one chunk and every width into one pass a step, also where
    the blocks after the target layer are offloaded (they compute on the GPU); where they compute
    on the CPU ("split", from block 2), the CPU's layout."""
    from lmedit.core.layout import build_layout, buckets
    from lmedit.core.targets import passes_device, plan_chunks

    model = make_tiny("llama", seed=3)
    model = model.to(GPU) if where == "gpu" else _dispatch(model, where)
    adapter = get_adapter(model)
    reqs = REQUESTS * 30
    want = "cpu" if where == "split" else "cuda"
    assert passes_device(model, adapter, 1).type == want
    chunks = plan_chunks(model, tokenizer, adapter, reqs, ["{}"], 1, 0, None)
    assert chunks == ([(0, 90)] if want == "cuda" else [(0, 64), (64, 90)])
    lay = build_layout(tokenizer, reqs, ["{}", "Some context. {}"])
    assert (len(buckets(lay, device=passes_device(model, adapter, 1))) == 1) == (want == "cuda")
