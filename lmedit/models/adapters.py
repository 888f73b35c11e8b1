"""Per-architecture edit points: one small declarative entry per ``config.model_type``.

Example: ``adapter = get_adapter(model); W = adapter.weight(model, 5)  # (d_out, d_in)``

An adapter names, relative to the model, the list of transformer blocks (the block output is the
residual stream), and relative to a block the MLP and the *edited projection*: the module whose
input is the key k and whose output is the value v (``mlp.c_proj`` in GPT-2, ``mlp.fc_out`` in
GPT-J, ``mlp.dense_4h_to_h`` in GPT-NeoX, ``mlp.down_proj`` in the Llama family). The layout of
the edited weight is declared, never guessed from shapes: ``"out_in"`` is ``nn.Linear``'s
(d_out, d_in); ``"in_out"`` is GPT-2's ``Conv1D``, which stores W transposed as (d_in, d_out).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from lmedit.models.offload import read_param, write_param
from lmedit.models.precision import module_device
from lmedit.errors import UnsupportedArchitectureError

WeightLayout = Literal["out_in", "in_out"]


@dataclass(frozen=True)
class ModelAdapter:
    """Where the edit points of one architecture live (module paths are dotted attribute paths)."""

    model_type: str  # config.model_type this entry serves, e.g. "llama"
    blocks: str  # ModuleList of transformer blocks, from the model root, e.g. "model.layers"
    edit: str  # edited projection, relative to a block; its input is k, its output v
    mlp: str  # the MLP, relative to a block; its output is what ROME's delta is added to
    final_norm: str  # final norm before the unembedding, from the model root
    unembed: str  # the unembedding (lm head), from the model root
    layout: WeightLayout  # storage of the edited weight: "out_in" (nn.Linear) or "in_out" (Conv1D)
    attn: str | None = None  # the attention, relative to a block (causal tracing restores its output)
    # a norm applied to the MLP's output before it joins the residual stream, relative to a block
    # (Gemma 2/3's post_feedforward_layernorm); None: the edited projection's output is added as is
    post_mlp_norm: str | None = None

    def __post_init__(self) -> None:
        if self.layout not in ("out_in", "in_out"):
            raise ValueError(f"layout must be 'out_in' or 'in_out', got {self.layout!r}")

    # --- module lookup -------------------------------------------------------------------
    def block_list(self, model: nn.Module) -> nn.ModuleList:
        return self.resolve(model, self.blocks)

    def n_layers(self, model: nn.Module) -> int:
        return len(self.block_list(model))

    def block(self, model: nn.Module, layer: int) -> nn.Module:
        blocks = self.block_list(model)
        if not 0 <= layer < len(blocks):
            raise IndexError(
                f"layer {layer} is out of range: this {self.model_type} model has layers 0..{len(blocks) - 1}"
            )
        return blocks[layer]

    def edit_module(self, model: nn.Module, layer: int) -> nn.Module:
        return self.resolve(self.block(model, layer), self.edit)

    def mlp_module(self, model: nn.Module, layer: int) -> nn.Module:
        return self.resolve(self.block(model, layer), self.mlp)

    def attn_module(self, model: nn.Module, layer: int) -> nn.Module:
        if self.attn is None:
            raise UnsupportedArchitectureError(f"adapter {self.model_type!r} names no attention module (attn=...)")
        return self.resolve(self.block(model, layer), self.attn)

    def unembed_module(self, model: nn.Module) -> nn.Module:
        """The lm head: the declared path, else ``get_output_embeddings()`` (renamed across transformers
        versions: GPT-NeoX's ``embed_out`` is ``lm_head`` from transformers 5)."""
        try:
            return self.resolve(model, self.unembed)
        except AttributeError:
            head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            if head is None:
                raise
            return head

    def final_norm_module(self, model: nn.Module) -> nn.Module:
        return self.resolve(model, self.final_norm)

    def decoder(self, model: nn.Module) -> nn.Module:
        """The model without its lm head: blocks and final norm, returning ``last_hidden_state``."""
        return model.get_decoder() if hasattr(model, "get_decoder") else model.base_model

    @staticmethod
    def resolve(root: nn.Module, path: str) -> nn.Module:
        """The submodule at dotted ``path`` below ``root``, with an error naming the missing part."""
        obj: nn.Module = root
        for part in path.split("."):
            if not hasattr(obj, part):
                raise AttributeError(f"module path {path!r} not found in {type(root).__name__}: no attribute {part!r}")
            obj = getattr(obj, part)
        return obj

    def edit_param_name(self, layer: int) -> str:
        """Full parameter name of the edited weight, e.g. ``model.layers.5.mlp.down_proj.weight``."""
        return f"{self.blocks}.{layer}.{self.edit}.weight"

    # --- the edited weight in the paper's orientation -------------------------------------
    def weight(self, model: nn.Module, layer: int) -> torch.Tensor:
        """W as (d_out, d_in), a view of the stored parameter (transposed for ``in_out``)."""
        return self.as_out_in(self.stored(model, layer))

    def output_change(self, model: nn.Module, layer: int, dz: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        """The change of the edited projection's output (B, d) that moves the residual stream by ``dz``.

        Without a post-MLP norm it is ``dz`` itself. With an RMS norm o -> g * o / rms(o) after the MLP
        (``out``: the projection's current outputs o), keeping rms(o) gives o' = o + rms(o) dz / g:
        the normalised direction moves by dz / g, so the norm's output moves by dz to first order (the
        norm is scale invariant; what a norm cannot add, a change of its output's length, later layers
        of the spread distribution take up). g is the norm's output for an all-ones input.
        """
        if self.post_mlp_norm is None:
            return dz
        if out is None:
            raise ValueError(f"{self.model_type}: the MLP output passes through {self.post_mlp_norm}; "
                             "output_change needs the projection's current outputs")
        norm = self.resolve(self.block(model, layer), self.post_mlp_norm)
        with torch.no_grad():
            ones = torch.ones(1, dz.shape[1], device=module_device(norm), dtype=torch.float32)
            g = norm(ones.to(read_param(norm, "weight").dtype)).float().cpu()[0]
        g = torch.where(g.abs() < 1e-3, torch.full_like(g, 1e-3) * torch.sign(g + 1e-12), g)  # never divide by ~0
        o = out.to(torch.float32)
        rms = o.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12)
        return (rms * dz.to(torch.float32) / g).to(dz.dtype)

    def stored(self, model: nn.Module, layer: int) -> torch.Tensor:
        """The edited parameter in its storage layout (read through accelerate's offload if offloaded)."""
        return read_param(self.edit_module(model, layer), "weight")

    def store(self, model: nn.Module, layer: int, value: torch.Tensor) -> None:
        """Write the edited parameter (storage layout), where the model reads it (offload included)."""
        write_param(self.edit_module(model, layer), "weight", value)

    def as_out_in(self, stored: torch.Tensor) -> torch.Tensor:
        """A tensor in the edited parameter's storage layout, viewed as (d_out, d_in)."""
        return stored if self.layout == "out_in" else stored.T

    def check(self, model: nn.Module) -> None:
        """Resolve every path once and check the declared layout against the module's own sizes."""
        self.final_norm_module(model)
        self.unembed_module(model)
        mod = self.edit_module(model, 0)
        self.mlp_module(model, 0)
        if self.post_mlp_norm is not None:
            self.resolve(self.block(model, 0), self.post_mlp_norm)
        elif hasattr(self.block(model, 0), "post_feedforward_layernorm"):
            raise ValueError(f"adapter {self.model_type!r}: the blocks normalise the MLP output "
                             "(post_feedforward_layernorm) but the adapter does not declare it; add "
                             "post_mlp_norm='post_feedforward_layernorm' or edits will land weakly")
        viewed = tuple(self.weight(model, 0).shape)  # (d_out, d_in) if the layout is right
        if isinstance(mod, nn.Linear):
            expect, layout = (mod.out_features, mod.in_features), "out_in"
        elif hasattr(mod, "nf") and hasattr(mod, "nx"):  # transformers' Conv1D: y = x @ W + b
            expect, layout = (mod.nf, mod.nx), "in_out"
        else:
            return  # unknown module kind: trust the declaration
        if viewed != expect or layout != self.layout:
            raise ValueError(
                f"adapter {self.model_type!r}: {type(mod).__name__} weight viewed as (d_out, d_in) has shape "
                f"{viewed}, expected {expect}; the declared layout={self.layout!r} is wrong"
            )


_LLAMA_LIKE = dict(
    blocks="model.layers", edit="mlp.down_proj", mlp="mlp", final_norm="model.norm",
    unembed="lm_head", layout="out_in", attn="self_attn",
)

_REGISTRY: dict[str, ModelAdapter] = {}


def register_adapter(adapter: ModelAdapter, *, overwrite: bool = False) -> ModelAdapter:
    """Register an adapter for ``adapter.model_type``.

    Example: ``register_adapter(ModelAdapter("starcoder2", blocks="model.layers", edit="mlp.c_proj", mlp="mlp",
    final_norm="model.norm", unembed="lm_head", layout="out_in"))``
    """
    if adapter.model_type in _REGISTRY and not overwrite:
        raise ValueError(f"an adapter for {adapter.model_type!r} exists; pass overwrite=True to replace it")
    _REGISTRY[adapter.model_type] = adapter
    return adapter


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def get_adapter(model_or_type: nn.Module | str) -> ModelAdapter:
    """The adapter for a model (by its ``config.model_type``) or a model_type string.

    Example: ``get_adapter("gpt2").edit == "mlp.c_proj"``
    """
    if isinstance(model_or_type, str):
        model_type = model_or_type
    else:
        config = getattr(model_or_type, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type is None:
            raise UnsupportedArchitectureError(
                f"{type(model_or_type).__name__} has no config.model_type; lmedit edits Hugging Face models"
            )
    try:
        return _REGISTRY[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"unknown architecture {model_type!r}: lmedit has adapters for {', '.join(supported_model_types())}. "
            "Register one with lmedit.models.register_adapter(ModelAdapter(model_type=..., blocks=..., "
            "edit=..., mlp=..., final_norm=..., unembed=..., layout='out_in'|'in_out')) "
            "(see docs/adding_a_model.md)."
        ) from None


for _adapter in (
    ModelAdapter("gpt2", blocks="transformer.h", edit="mlp.c_proj", mlp="mlp",
                 final_norm="transformer.ln_f", unembed="lm_head", layout="in_out", attn="attn"),
    ModelAdapter("gptj", blocks="transformer.h", edit="mlp.fc_out", mlp="mlp",
                 final_norm="transformer.ln_f", unembed="lm_head", layout="out_in", attn="attn"),
    ModelAdapter("gpt_neox", blocks="gpt_neox.layers", edit="mlp.dense_4h_to_h", mlp="mlp",
                 final_norm="gpt_neox.final_layer_norm", unembed="lm_head", layout="out_in", attn="attention"),
    *(ModelAdapter(t, **_LLAMA_LIKE) for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "olmo", "phi3")),
    # Gemma 2 and 3 normalise the MLP output before the residual add
    *(ModelAdapter(t, **_LLAMA_LIKE, post_mlp_norm="post_feedforward_layernorm") for t in ("gemma2", "gemma3_text")),
):
    register_adapter(_adapter)
