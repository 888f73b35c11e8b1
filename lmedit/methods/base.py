"""Hyperparameters shared by every method, and the method registry.

Example: ``hp = get_method("emmet").hparams_cls.from_dict({"layers": [4, 5, 6, 7, 8]})``

A method is one hyperparameter dataclass: its fields (with help text and rules), the closed form
of its objective (``solver()``), and two class constants: ``anchor`` (where its targets are
optimised by default, see ``target_site``) and ``sequential`` (edit requests one after another, as ROME, instead of as one
batch). Everything else (keys, targets, statistics, distribution over layers) is shared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from lmedit.config import param
from lmedit.core.distribute import JointForm, Solver, distribution_names
from lmedit.core.targets import TargetConfig
from lmedit.errors import HyperparameterError
from lmedit.models.precision import ACCUMULATE_DTYPES, COMPUTE_DTYPES



@dataclass(frozen=True)
class EditHParams(TargetConfig):
    """Hyperparameters of every method (names follow the reference repositories).

    The target-vector settings are inherited from :class:`lmedit.core.targets.TargetConfig`.
    """

    layers: tuple[int, ...] = param((4, 5, 6, 7, 8), "edited layers, increasing; targets live at the last one")
    context_templates: tuple[tuple[int, int], ...] = param(((10, 5),), "(tokens, count) per context-template group")
    seed: int = param(0, "seed of the context-template sampler")
    mom2_corpus: str = param("wikipedia-excerpt", "corpus of the statistics C: a name or a .txt/.jsonl path")
    mom2_n_samples: int = param(2000, "texts in the statistics (2,000 excerpt paragraphs are about 265k SmolLM2 "
                                "tokens)", min=1)
    mom2_max_length: int = param(1024, "tokens per statistics text", min=8)
    mom2_dtype: str = param("float64", "accumulation dtype of C", choices=tuple(ACCUMULATE_DTYPES))
    mom2_forward_dtype: str = param("model", "dtype of the statistics forward pass", choices=COMPUTE_DTYPES)
    mom2_adjustment: bool = param(True, "False: C = I (no statistics; as EasyEdit's Llama ROME file)")
    mom2_update_weight: float = param(1.0, "lambda, the weight of the preserved keys' C", gt=0)

    chat_prompts: str = param("auto", "also optimise the targets (and read the keys) with every context template "
                              "inside the user turn of the tokenizer's chat template, the answer in the assistant "
                              "turn: 'on', 'off', 'auto' (on when the tokenizer has a chat template), or 'bare' "
                              "(only the bare prompt in the chat form: fewer rows)",
                              choices=("off", "on", "auto", "bare"))
    distribution: str = param("spread", "how the residual is shared among the layers: a registered distribution "
                              "(single, spread, joint, cascade, refit; `lmedit list`)")
    refit_base: str = param("spread", "with distribution='refit': the distribution each pass runs")
    refit_tol: float = param(0.05, "with distribution='refit': stop once the residual at the last layer is below "
                             "this share of where it started", gt=0)
    refit_passes: int = param(3, "with distribution='refit': at most this many passes", min=1)
    target_site: str = param("auto", "where the target vector is optimised: 'block' (the residual stream after the "
                             "last edited layer; MEMIT, EMMET), 'mlp' (the last edited layer's MLP output, where the "
                             "edit is written; ROME), 'auto' (the method's own). Where a block normalises its MLP "
                             "output before adding it (Gemma 2/3), 'mlp' targets are reachable and each layer's "
                             "share is converted through its norm; measured on Gemma 3 they land with one layer "
                             "(distribution single), not shared over several (results/gemma_postnorm)",
                             choices=("auto", "block", "mlp"))
    preserve_edits: bool = param(False, "add the keys of this Editor's earlier edits to the preserved set "
                                 "(sum K_p K_p^T; for lifelong editing)")
    preserve_weight: float = param(1.0, "with preserve_edits: the weight of each edit's k k^T as it joins the "
                                   "preserved sum (1: recursive least squares, later batches weigh earlier edits like "
                                   "their own; more: earlier edits win where keys conflict)", gt=0)
    refresh_earlier_keys: bool = param(False, "with preserve_edits: before each edit writes, read the keys of every "
                                       "earlier edited (and protected) fact again on the weights as they are then, "
                                       "instead of keeping the keys read when it was edited, which later edits of "
                                       "lower layers move (results/README.md, 'Earlier keys drift'). Costs one key "
                                       "pass over all earlier facts per edit, which take this edit's preserve_weight; "
                                       "undoing an edit leaves the sum as refreshed before it. Refused after loading "
                                       "a ledger with protected facts (it keeps only their keys' sum)")
    supersede_edits: bool = param(True, "with preserve_edits: a request that asks an earlier edited fact again (the "
                                  "same subject and prompt, e.g. with a new answer) takes that fact's key out of the "
                                  "preserved set, so its new value replaces the old one instead of being averaged with "
                                  "it (results/README.md, 'Editing a fact again'). Needs the earlier key: kept by a "
                                  "ledger or this Editor's history, or read again with refresh_earlier_keys; "
                                  "otherwise the earlier key stays, with a warning")
    norm_anchor: bool = param(False, "Norm-Anchor Scaling (Liu et al. 2026; for lifelong editing): rescale each "
                              "request's value vector v* (the MLP output of the last edited layer its target asks "
                              "for) to norm_reference, so that edited weights cannot inflate later targets")
    norm_reference: float = param(0.0, "with norm_anchor: the norm value vectors are rescaled to; 0: measured on the "
                                  "first batch this Editor edits while the model carries none of its edits (mean "
                                  "||v*|| without the largest 5 %; ROME: the first request's), then kept for later batches "
                                  "and in the ledger; edits made before the Editor cannot be seen, so begin on the "
                                  "unedited model or give the value",
                                  min=0)

    anchor: ClassVar[str] = "block"  # target norms relative to the block output (MEMIT) or MLP output (ROME)
    sequential: ClassVar[bool] = False  # edit requests one after another (ROME) instead of as one batch
    summary: ClassVar[str] = ""  # one line for `lmedit list` and --list-hparams

    def validate(self) -> None:
        super().validate()
        if not self.layers or min(self.layers) < 0 or list(self.layers) != sorted(set(self.layers)):
            self.fail("layers", "a non-empty, strictly increasing list of layer indices >= 0")
        if not all(length >= 2 and n >= 1 for length, n in self.context_templates):
            self.fail("context_templates", "a list of (length >= 2, count >= 1) pairs")
        for name in ("distribution", "refit_base"):
            if getattr(self, name).strip().lower() not in distribution_names():
                self.fail(name, f"one of the registered distributions {distribution_names()}")
        if self.refit_base.strip().lower() == "refit":
            self.fail("refit_base", "another distribution than refit")
        if not math.isfinite(self.preserve_weight):
            self.fail("preserve_weight", "a finite number > 0")
        if self.preserve_weight != 1.0 and not self.preserve_edits:
            self.fail("preserve_weight", "used with preserve_edits=True (it weighs the preserved keys of earlier edits)")
        if self.refresh_earlier_keys and not self.preserve_edits:
            self.fail("refresh_earlier_keys", "used with preserve_edits=True (there are no earlier keys to refresh without it)")

    @property
    def site(self) -> str:
        """The resolved ``target_site``: "block" or "mlp"."""
        return self.anchor if self.target_site == "auto" else self.target_site

    @property
    def needs_null_space(self) -> bool:
        """Whether the solver reads ``LayerSystem.null_basis`` (AlphaEdit)."""
        return False

    def solver(self) -> Solver:
        """The objective's closed form with this method's weights bound: (R, K, system) -> dW."""
        raise NotImplementedError

    def joint_form(self) -> JointForm:
        """The objective through its per-layer metric, for distributions that solve layers together."""
        raise HyperparameterError(f"{type(self).__name__} defines no joint_form(), so it pairs only with distributions "
                                  "that solve one layer at a time (single, spread, refit of those)")


@dataclass(frozen=True)
class Method:
    """A registered method: its name and its hyperparameter class (which defines everything else)."""

    name: str
    hparams_cls: type[EditHParams]

    @property
    def sequential(self) -> bool:
        return self.hparams_cls.sequential

    @property
    def summary(self) -> str:
        return self.hparams_cls.summary


_METHODS: dict[str, Method] = {}


def register_method(name: str, hparams_cls: type[EditHParams], *, overwrite: bool = False) -> Method:
    """Register ``hparams_cls`` under ``name`` (lower-cased). Example: ``register_method("mine", MyHParams)``"""
    key = name.strip().lower()
    if not key or not isinstance(hparams_cls, type) or not issubclass(hparams_cls, EditHParams):
        raise HyperparameterError(f"register_method({name!r}, {hparams_cls!r}): need a name and an EditHParams subclass")
    if hparams_cls.solver is EditHParams.solver:
        raise HyperparameterError(f"{hparams_cls.__name__} does not define solver()")
    if key in _METHODS and not overwrite:
        raise HyperparameterError(f"a method named {key!r} is registered already; pass overwrite=True to replace it")
    _METHODS[key] = Method(key, hparams_cls)
    return _METHODS[key]


def get_method(name: str) -> Method:
    try:
        return _METHODS[name.strip().lower()]
    except KeyError:
        raise HyperparameterError(f"unknown method {name!r}; available: {', '.join(method_names())}") from None


def method_names() -> list[str]:
    return sorted(_METHODS)
