"""Per-model hyperparameters, each citing where its numbers came from.

Example: ``preset_for(model)  # -> "smollm2-135m" for the embedded model``

A preset is matched by architecture (``model_type``, number of layers, hidden size), never by a
model's name. Numbers for the reference models are copied from the reference repositories'
hyperparameter files (path and commit given); ``mom2_n_samples`` there counts Wikipedia articles.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lmedit.errors import HyperparameterError

_GPT2XL_COMMON = dict(v_lr=0.5, v_weight_decay=0.5, kl_factor=0.0625, mom2_n_samples=100000, mom2_corpus="wikipedia")
_GPTJ_COMMON = dict(v_lr=0.5, v_weight_decay=0.5, kl_factor=0.0625, mom2_n_samples=100000, mom2_corpus="wikipedia")
_LLAMA2_COMMON = dict(v_num_grad_steps=25, v_lr=0.5, v_weight_decay=1e-3, kl_factor=0.0625, clamp_norm_factor=4.0,
                      mom2_n_samples=100000, mom2_corpus="wikipedia")

# The embedded model runs on CPUs: "auto" uses bfloat16 copies of the model for the statistics pass
# and the target optimisation where bf16 matmuls are native (AVX512-BF16/AMX, GPUs), float32 elsewhere.
# Measured on 32 CounterFact records (results/README.md): quality within 2 points of the reference.
_SMOL_FAST = dict(mom2_n_samples=2000, mom2_corpus="wikipedia-excerpt", mom2_forward_dtype="auto", compute_dtype="auto")

PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-xl": {
        "match": {"model_type": "gpt2", "n_layers": 48, "hidden_size": 1600},
        "rome": dict(_GPT2XL_COMMON, layers=[17], v_num_grad_steps=20, clamp_norm_factor=4.0),
        "memit": dict(_GPT2XL_COMMON, layers=[13, 14, 15, 16, 17], v_num_grad_steps=20, clamp_norm_factor=0.75,
                      mom2_update_weight=20000.0),
        "emmet": dict(_GPT2XL_COMMON, layers=[17], v_num_grad_steps=20, clamp_norm_factor=0.75,
                      mom2_update_weight=1000.0, emmet_lambda=0.1),
        "sources": {
            "rome": "kmeng01/rome hparams/ROME/gpt2-xl.json @0c06752",
            "memit": "zjunlp/EasyEdit hparams/MEMIT/gpt2-xl.json @a781d66 (same values as kmeng01/memit)",
            "emmet": "scalable-model-editing/unified-model-editing hparams/EMMET/gpt2-xl.json @dabbb96",
        },
    },
    "gpt-j-6b": {
        "match": {"model_type": "gptj", "n_layers": 28, "hidden_size": 4096},
        "rome": dict(_GPTJ_COMMON, layers=[5], v_num_grad_steps=20, clamp_norm_factor=4.0),
        "memit": dict(_GPTJ_COMMON, layers=[3, 4, 5, 6, 7, 8], v_num_grad_steps=25, clamp_norm_factor=0.75,
                      mom2_update_weight=15000.0),
        "emmet": dict(_GPTJ_COMMON, layers=[5], v_num_grad_steps=25, clamp_norm_factor=0.75,
                      mom2_update_weight=10000.0, emmet_lambda=0.1),
        "sources": {
            "rome": "kmeng01/rome hparams/ROME/EleutherAI_gpt-j-6B.json @0c06752",
            "memit": "kmeng01/memit hparams/MEMIT/EleutherAI_gpt-j-6B.json @ef6f4cd",
            "emmet": "scalable-model-editing/unified-model-editing hparams/EMMET/EleutherAI_gpt-j-6B.json @dabbb96",
        },
    },
    "llama-2-7b": {
        "match": {"model_type": "llama", "n_layers": 32, "hidden_size": 4096},
        "rome": dict(_LLAMA2_COMMON, layers=[5], mom2_adjustment=False),
        "memit": dict(_LLAMA2_COMMON, layers=[4, 5, 6, 7, 8], mom2_update_weight=15000.0),
        "emmet": dict(_LLAMA2_COMMON, layers=[5], mom2_update_weight=1.0, emmet_lambda=0.1),
        "sources": {
            "rome": "zjunlp/EasyEdit hparams/ROME/llama-7b.yaml @08da19c (mom2_adjustment false)",
            "memit": "zjunlp/EasyEdit hparams/MEMIT/llama-7b.yaml @3fb01b3",
            "emmet": "scalable-model-editing/unified-model-editing hparams/EMMET/llama2-7b.json @ac0cb39",
        },
    },
    "smollm2-135m": {
        # The embedded default. Layers 4-8 and the preservation weights are the settings whose
        # reference-code results DEVELOPERS.md reports on this model (EMMET lambda 1, ridge 0.1:
        # ES/PS/NS 100/95.3/63.4; MEMIT lambda 1,500: 100/89.1/64.1; GPT-J's 15,000 under-edits);
        # the target-optimisation settings are the Llama-2-7b ones (same architecture family).
        # Statistics: 2,000 paragraphs of the offline Wikipedia excerpt (about 265k tokens).
        "match": {"model_type": "llama", "n_layers": 30, "hidden_size": 576},
        "rome": dict(_LLAMA2_COMMON, **_SMOL_FAST, layers=[6]),
        "memit": dict(_LLAMA2_COMMON, **_SMOL_FAST, layers=[4, 5, 6, 7, 8], mom2_update_weight=1500.0),
        "emmet": dict(_LLAMA2_COMMON, **_SMOL_FAST, layers=[4, 5, 6, 7, 8], mom2_update_weight=1.0, emmet_lambda=0.1),
        "sources": {"all": "DEVELOPERS.md measurements of the reference code on this model; see the comment above"},
    },
}


def _shape(model: nn.Module) -> dict[str, Any]:
    from lmedit.models.adapters import get_adapter

    cfg = model.config
    return {
        "model_type": cfg.model_type,
        "n_layers": get_adapter(model).n_layers(model),
        "hidden_size": getattr(cfg, "hidden_size", getattr(cfg, "n_embd", None)),
    }


def preset_for(model: nn.Module) -> str | None:
    """Name of the preset whose architecture matches ``model``, or None."""
    shape = _shape(model)
    for name, p in PRESETS.items():
        if p["match"] == shape:
            return name
    return None


def generic_layers(n_layers: int, method: str) -> list[int]:
    """Layers for a model without a preset: five consecutive layers from n/7 (4-8 for 30 layers,
    3-7 for 28), the middle one for ROME."""
    start = n_layers // 7
    window = list(range(start, min(n_layers, start + 5)))
    return [window[len(window) // 2]] if method == "rome" else window


def preset_values(model: nn.Module, method: str, preset: str | None = None) -> tuple[str, dict[str, Any]]:
    """(preset name, hyperparameter values) for ``method`` on ``model``; ``preset="none"`` skips presets."""
    from lmedit.models.adapters import get_adapter

    if preset is None:
        preset = preset_for(model)
    if preset in (None, "none", "generic"):
        return "generic", {"layers": generic_layers(get_adapter(model).n_layers(model), method)}
    if preset not in PRESETS:
        raise HyperparameterError(f"unknown preset {preset!r}; available: {', '.join(PRESETS)} or 'none'")
    values = PRESETS[preset].get(method)
    if values is None:
        raise HyperparameterError(f"preset {preset!r} has no values for method {method!r}")
    return preset, dict(values)
