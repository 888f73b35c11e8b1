"""The worked examples in the docs run as written."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import torch

import lmedit
from helpers import REQUESTS, assert_same, edit_kwargs, snapshot, spd_covariances, target_logprob

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def _run_as_module(block: str) -> None:
    """Run a docs block as a user's module would run (dataclass annotations resolve in its namespace)."""
    module = types.ModuleType("docs_example")
    sys.modules[module.__name__] = module  # kept, as a user's module is: its classes resolve their annotations there
    exec(compile(block, "docs_example.py", "exec"), module.__dict__)


def test_adding_a_model_example_registers_starcoder2_and_edits_it(tokenizer):
    import transformers as tf

    from lmedit.models import adapters

    (block,) = _python_blocks(DOCS / "adding_a_model.md")
    saved = dict(adapters._REGISTRY)
    try:
        _run_as_module(block)
        cfg = tf.Starcoder2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                  initializer_range=0.1, sliding_window=None, pad_token_id=tokenizer.pad_token_id,
                                  eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
        torch.manual_seed(0)
        model = tf.AutoModelForCausalLM.from_config(cfg).eval()
        with torch.no_grad():
            model.model.norm.weight.mul_(4.0)  # room for an edit to show (see conftest's LOGIT_GAIN)
        lmedit.get_adapter(model).check(model)
        before = [target_logprob(model, tokenizer, r) for r in REQUESTS]
        kw = edit_kwargs("emmet")
        res = lmedit.edit(model, tokenizer, REQUESTS, "emmet", covariances=spd_covariances(model, kw["layers"]), **kw)
        after = [target_logprob(model, tokenizer, r) for r in REQUESTS]
        assert all(a > b + 1.0 for a, b in zip(after, before)), (before, after)
        assert set(res.deltas) == {1, 2}
    finally:
        adapters._REGISTRY.clear()
        adapters._REGISTRY.update(saved)


def test_adding_a_method_example_registers_and_edits(fresh, tokenizer):
    from lmedit.methods import base

    (block,) = _python_blocks(DOCS / "adding_a_method.md")
    saved = dict(base._METHODS)
    try:
        _run_as_module(block)
        model = fresh("llama")
        before = snapshot(model)
        lp0 = target_logprob(model, tokenizer, REQUESTS[0])
        kw = edit_kwargs("memit")
        res = lmedit.edit(model, tokenizer, REQUESTS, "ridge_memit", covariances=spd_covariances(model, kw["layers"]),
                          **kw)
        assert res.hparams.mu == 10.0 and res.method == "ridge_memit"
        assert target_logprob(model, tokenizer, REQUESTS[0]) > lp0 + 1.0
        res.undo()
        assert_same(model, before)
    finally:
        base._METHODS.clear()
        base._METHODS.update(saved)
