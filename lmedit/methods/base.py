"""Hyperparameters shared by every method, and the method registry.

Example: ``hp = get_method("emmet").hparams_cls.from_dict({"layers": [4, 5, 6, 7, 8]})``

A method is a hyperparameter dataclass plus a solver (the objective's closed form); whether it
edits requests one after another (ROME) or as one batch is a flag. Everything else (keys,
targets, statistics, distribution over layers) is shared.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch

from lmedit.core.targets import TargetConfig
from lmedit.errors import HyperparameterError


@dataclass
class EditHParams:
    """Hyperparameters of every method (names follow the reference repositories)."""

    layers: tuple[int, ...] = (4, 5, 6, 7, 8)  # edited layers; targets live at the last one
    # --- target vectors (see lmedit.core.targets) ---
    v_num_grad_steps: int = 25  # Adam steps
    v_lr: float = 0.5  # Adam learning rate
    v_weight_decay: float = 0.5  # weight of ||delta|| / ||init||^2
    clamp_norm_factor: float = 0.75  # ||delta|| <= factor * ||init||
    kl_factor: float = 0.0625  # KL weight on "{subject} is a"
    early_stop_loss: float = 0.05  # per-request stopping loss
    chunk_requests: int = 64  # requests optimised together
    compute_dtype: str = "model"  # dtype of the target optimisation: model | float32 | bfloat16 | auto
    context_templates: tuple[tuple[int, int], ...] = ((10, 5),)  # (tokens, count) per template group
    seed: int = 0  # seed of the context-template sampler
    # --- second-moment statistics C (see lmedit.core.stats) ---
    mom2_corpus: str = "wikipedia-excerpt"  # corpus name or path
    mom2_n_samples: int = 2000  # texts (paragraphs of the excerpt: 2,000 are about 262k SmolLM2 tokens)
    mom2_max_length: int = 1024  # tokens per text
    mom2_dtype: str = "float64"  # accumulation dtype
    mom2_forward_dtype: str = "model"  # dtype of the statistics forward pass: model | bfloat16 | float32
    mom2_adjustment: bool = True  # False: C = I (no statistics; as EasyEdit's Llama ROME file)
    # --- objective ---
    mom2_update_weight: float = 1.0  # lambda, the weight of preserved keys C

    anchor: ClassVar[str] = "block"  # target norms relative to the block output (MEMIT) or MLP output (ROME)

    def __post_init__(self) -> None:
        self.layers = tuple(int(x) for x in self.layers)
        self.context_templates = tuple(tuple(int(v) for v in x) for x in self.context_templates)  # type: ignore[misc]
        self.validate()

    def validate(self) -> None:
        def need(cond: bool, name: str, rule: str) -> None:
            if not cond:
                raise HyperparameterError(f"{type(self).__name__}.{name} = {getattr(self, name)!r}: must be {rule}")

        need(len(self.layers) > 0 and all(x >= 0 for x in self.layers), "layers", "a non-empty list of layer indices >= 0")
        need(list(self.layers) == sorted(set(self.layers)), "layers", "strictly increasing")
        need(self.v_num_grad_steps >= 1, "v_num_grad_steps", ">= 1")
        need(self.v_lr > 0, "v_lr", "> 0")
        need(self.v_weight_decay >= 0, "v_weight_decay", ">= 0")
        need(self.clamp_norm_factor > 0, "clamp_norm_factor", "> 0")
        need(self.kl_factor >= 0, "kl_factor", ">= 0")
        need(self.chunk_requests >= 1, "chunk_requests", ">= 1")
        need(self.compute_dtype in ("model", "float32", "bfloat16", "float16", "auto"), "compute_dtype",
             "one of model, float32, bfloat16, float16, auto")
        need(all(len(x) == 2 and x[0] >= 2 and x[1] >= 1 for x in self.context_templates), "context_templates",
             "a list of (length >= 2, count >= 1) pairs")
        need(self.mom2_n_samples >= 1, "mom2_n_samples", ">= 1")
        need(self.mom2_max_length >= 8, "mom2_max_length", ">= 8")
        need(self.mom2_dtype in ("float32", "float64"), "mom2_dtype", "float32 or float64")
        need(self.mom2_forward_dtype in ("model", "float32", "bfloat16", "float16", "auto"), "mom2_forward_dtype",
             "one of model, float32, bfloat16, float16, auto")
        need(self.mom2_update_weight > 0, "mom2_update_weight", "> 0")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "EditHParams":
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise HyperparameterError(
                f"unknown hyperparameter(s) {', '.join(unknown)} for {cls.__name__}; known: {', '.join(cls.field_names())}"
            )
        return cls(**values)

    def replace(self, **overrides: Any) -> "EditHParams":
        merged = {**self.to_dict(), **overrides}
        return type(self).from_dict(merged)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layers"] = list(self.layers)
        d["context_templates"] = [list(x) for x in self.context_templates]
        return d

    def target_config(self) -> TargetConfig:
        return TargetConfig(
            v_num_grad_steps=self.v_num_grad_steps, v_lr=self.v_lr, v_weight_decay=self.v_weight_decay,
            clamp_norm_factor=self.clamp_norm_factor, kl_factor=self.kl_factor,
            early_stop_loss=self.early_stop_loss, anchor=self.anchor, chunk_requests=self.chunk_requests,
            compute_dtype=self.compute_dtype,
        )

    def solver(self) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        raise NotImplementedError


@dataclass(frozen=True)
class Method:
    name: str
    hparams_cls: type[EditHParams]
    sequential: bool  # edit requests one after another (ROME) instead of as one batch
    summary: str = ""


_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    _METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    try:
        return _METHODS[name.lower()]
    except KeyError:
        raise HyperparameterError(f"unknown method {name!r}; available: {', '.join(sorted(_METHODS))}") from None


def method_names() -> list[str]:
    return sorted(_METHODS)


def parse_value(text: str) -> Any:
    """Parse a ``--set key=value`` value: JSON where it parses (numbers, lists, booleans), else a string."""
    import json

    try:
        return json.loads(text)
    except ValueError:
        if "," in text:
            return [parse_value(x) for x in text.split(",")]
        return text
