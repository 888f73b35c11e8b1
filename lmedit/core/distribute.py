"""Edit-distribution algorithms: which layers are edited and how the residual is shared among them.

Example::

    lmedit.edit(model, tok, requests, method="emmet", distribution="joint")   # any objective, any distribution
    register_distribution("mine", my_function, "one line for `lmedit list`")

Targets z* are residual-stream vectors at the LAST edited layer. A distribution is a short function
of :class:`Pieces`, the shared parts every distribution composes: the keys at some layers
(``keys_at``, one forward pass however many layers it reads), the residual still missing at the
last layer on the bare prompts (``missing``: z* - z_now), the objective's closed form for one layer
(``solve``) or for several layers as one problem (``solve_joint``), and the write (``write``). The
objective (ROME / MEMIT / EMMET / AlphaEdit ...) is the method's; the distribution never knows
which. Built in (derivations in ``docs/distributions.md``):

* ``single``: the last layer alone takes the whole residual.
* ``spread`` (MEMIT's): for layer l_i, i = 0..L-1, with the earlier layers already written,
  K_i = keys at l_i (recomputed), R_i = (z* - z_now) / (L - i), dW_i = solve(R_i, K_i).
* ``joint``: one key pass with the unedited weights, then all layers solved as one problem,
  minimising sum_l ||dW_l||^2 in each layer's preservation metric subject to sum_l dW_l K_l = R
  (or its least-squares analogue): layers share the residual by their capacity.
* ``refit``: a pass of ``refit_base`` (any other distribution), then again on what is still
  missing (later layers' keys moved), until the residual falls below ``refit_tol`` of where it
  started or ``refit_passes`` passes ran; a pass after the first that does not shrink the residual is
  undone (bit for bit) and ends the refit, so refit never leaves more of the residual than its
  base's first pass.
* ``cascade``: layer by layer like ``spread`` (keys recomputed after each write), but each layer
  takes its share of a joint solve over the layers still to be written instead of an equal share.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from lmedit.core import solvers
from lmedit.core.keys import STATE_BYTES, PromptStates, bare_prompts, collect_keys, key_prompts, residual_stream
from lmedit.core.weights import WeightTransaction
from lmedit.errors import HyperparameterError
from lmedit.models.adapters import ModelAdapter
from lmedit.requests import EditRequest

log = logging.getLogger(__name__)


@dataclass
class LayerSystem:
    """What a layer's closed form reads besides R and K."""

    C: torch.Tensor  # (d_in, d_in) second moment of the preserved keys (a mean over corpus tokens)
    earlier: torch.Tensor | None = None  # (d_in, d_in) float64 sum of K_p K_p^T over earlier edits' keys
    null_basis: torch.Tensor | None = None  # (d_in, r) orthonormal basis of C's null space (AlphaEdit)


Solver = Callable[[torch.Tensor, torch.Tensor, LayerSystem], torch.Tensor]  # (R, K, system) -> dW


@dataclass(frozen=True)
class JointForm:
    """An objective seen through its per-layer metric (see ``lmedit.core.solvers.joint``)."""

    kind: str  # "least_squares" or "equality"
    metric_solve: Callable[[torch.Tensor, LayerSystem], torch.Tensor]  # (K (d_in, B), system) -> M^-1 K
    ridge: float = 0.0  # equality: the ridge on sum_l K_l^T M_l^-1 K_l


@dataclass
class Pieces:
    """The shared parts of every distribution, for one batch, and what they record."""

    model: torch.nn.Module
    tokenizer: object
    adapter: ModelAdapter
    tx: WeightTransaction
    requests: Sequence[EditRequest]
    template_groups: Sequence[Sequence[str]]
    layers: Sequence[int]
    targets: torch.Tensor  # (B, d) z* at layers[-1]
    systems: dict[int, LayerSystem]
    solver: Solver
    joint_form: Callable[[], JointForm]  # the method's, built only when a distribution asks for it
    settings: object = None  # the hyperparameters (refit_base, refit_tol, refit_passes; site: where the targets were optimised)
    state_bytes: int = STATE_BYTES  # memory the kept hidden states between passes may take (see PromptStates)
    info: dict[int, dict[str, float]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=lambda: {"keys_s": 0.0, "residual_s": 0.0, "solve_s": 0.0})
    keys: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> the K its (last) solve used
    written: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> sum of this batch's writes
    versions: dict[int, int] = field(default_factory=dict)  # layer -> writes so far (what kept states check)
    _states: dict[str, PromptStates] = field(default_factory=dict, repr=False)

    def states(self, which: str) -> PromptStates:
        """The batch's template prompts ("keys") or bare prompts ("bare"), tokenised once, with the
        hidden states below the layers being written kept between passes (see PromptStates)."""
        if which not in self._states:
            prompts = key_prompts(self.requests, self.template_groups) if which == "keys" else bare_prompts(self.requests)
            self._states[which] = PromptStates(self.model, self.tokenizer, self.adapter, *prompts,
                                               floor=min(self.layers), state_bytes=self.state_bytes)
        return self._states[which]

    def keys_at(self, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """{layer: K (B, d_in)} with the weights as they are now (one pass, from the deepest valid
        kept state below the layers)."""
        t0 = time.perf_counter()
        K = collect_keys(self.model, self.tokenizer, self.adapter, self.requests, self.template_groups, list(layers),
                         states=self.states("keys"), versions=self.versions)
        self.timings["keys_s"] += time.perf_counter() - t0
        return K

    def missing(self) -> torch.Tensor:
        """z* - z_now (B, d): what the last layer's output still lacks on the bare prompts."""
        t0 = time.perf_counter()
        z_now = residual_stream(self.model, self.tokenizer, self.adapter, self.requests, self.layers[-1],
                                states=self.states("bare"), versions=self.versions)
        self.timings["residual_s"] += time.perf_counter() - t0
        return self.targets - z_now

    def solve(self, layer: int, R: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
        """The objective's dW (d_out, d_in) at ``layer`` for residuals R (B, d_out) and keys K (B, d_in).

        R is a change of the residual stream. Where the block normalises the MLP output before adding
        it (Gemma 2/3) and the targets were optimised at the MLP output (ROME's v*, so R is reachable
        through the norm), R becomes the change of the projection's output that the norm turns into
        it (``ModelAdapter.output_change``; exact for a reachable R). Residual-stream targets
        (MEMIT, EMMET) ask for more than one normalised output can give; for them the share is
        written as is (measured better on Gemma 3: results/gemma_postnorm)."""
        if self._through_norm():
            t0 = time.perf_counter()
            out = self.states("bare").read({"o": (layer, self.adapter.edit_module(self.model, layer))},
                                           capture="output", versions=self.versions)["o"]
            self.timings["residual_s"] += time.perf_counter() - t0
            R = self.adapter.output_change(self.model, layer, R, out)
        t0 = time.perf_counter()
        system = self.systems[layer]
        dev = system.C.device  # the layer's solve device (a GPU where it computes on one)
        dW = self.solver(R.T.to(dev), K.T.to(dev), system).to(R.device)
        self.timings["solve_s"] += time.perf_counter() - t0
        return dW

    def _through_norm(self) -> bool:
        return getattr(self.adapter, "post_mlp_norm", None) is not None and getattr(self.settings, "site", "block") == "mlp"

    def solve_joint(self, R: torch.Tensor, K: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """{layer: dW} solving every layer of ``K`` as one problem for the residual R (B, d_out)."""
        if self._through_norm():
            raise HyperparameterError(f"the joint solve assumes each layer's MLP output adds to the residual stream; "
                                      f"{self.adapter.model_type} normalises it first ({self.adapter.post_mlp_norm}): "
                                      "use distribution single, spread or refit")
        t0 = time.perf_counter()
        form = self.joint_form()
        layers = sorted(K)
        Ys = [form.metric_solve(K[l].T.to(self.systems[l].C.device, torch.float64), self.systems[l]).to(R.device)
              for l in layers]
        dWs = solvers.joint(R.T, [K[l].T for l in layers], Ys, form.kind, form.ridge)
        self.timings["solve_s"] += time.perf_counter() - t0
        return dict(zip(layers, dWs))

    def checkpoint(self) -> tuple:
        """What :meth:`back_to` needs to undo the writes that follow (weights bit for bit, diagnostics)."""
        return self.tx.checkpoint(), dict(self.written), dict(self.keys), {l: dict(v) for l, v in self.info.items()}

    def back_to(self, checkpoint: tuple) -> None:
        weights, written, keys, info = checkpoint
        for layer in self.tx.back_to(weights):  # kept hidden states above these layers are stale again
            self.versions[layer] = self.versions.get(layer, 0) + 1
        self.written, self.keys, self.info = dict(written), dict(keys), info

    def write(self, layer: int, dW: torch.Tensor, K: torch.Tensor, missing: torch.Tensor) -> None:
        """W_layer += dW, with the diagnostics (``missing``: the residual the solve saw, before any share)."""
        self.tx.add(layer, dW)
        self.versions[layer] = self.versions.get(layer, 0) + 1
        self.keys[layer] = K
        self.written[layer] = dW + self.written[layer] if layer in self.written else dW
        self.info[layer] = {
            "residual_norm": float(missing.norm(dim=1).mean()),
            "update_norm": float(self.written[layer].norm()),  # all passes of this batch (refit)
            "weight_norm": float(self.adapter.weight(self.model, layer).detach().float().norm()),
        }
        log.debug("layer %d: %s", layer, self.info[layer])


# --- the registry ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Distribution:
    name: str
    run: Callable[[Pieces], None]
    summary: str


_DISTRIBUTIONS: dict[str, Distribution] = {}


def register_distribution(name: str, run: Callable[[Pieces], None], summary: str, *,
                          overwrite: bool = False) -> Distribution:
    """Register ``run(pieces)`` under ``name`` (lower-cased); it writes its updates with ``pieces.write``."""
    key = name.strip().lower()
    if not key or not callable(run):
        raise HyperparameterError(f"register_distribution({name!r}, {run!r}): need a name and a function")
    if key in _DISTRIBUTIONS and not overwrite:
        raise HyperparameterError(f"a distribution named {key!r} is registered already; pass overwrite=True")
    _DISTRIBUTIONS[key] = Distribution(key, run, summary)
    return _DISTRIBUTIONS[key]


def get_distribution(name: str) -> Distribution:
    try:
        return _DISTRIBUTIONS[name.strip().lower()]
    except KeyError:
        raise HyperparameterError(f"unknown distribution {name!r}; available: {', '.join(distribution_names())}") from None


def distribution_names() -> list[str]:
    return sorted(_DISTRIBUTIONS)


def distribute(name: str, pieces: Pieces) -> tuple[dict[int, dict[str, float]], dict[str, float], dict[int, torch.Tensor]]:
    """Run distribution ``name``; returns (per-layer diagnostics, timings, keys as the solves used them)."""
    get_distribution(name).run(pieces)
    return pieces.info, pieces.timings, pieces.keys


# --- the built-in distributions -------------------------------------------------------------------

def single(p: Pieces) -> None:
    layer = p.layers[-1]
    K = p.keys_at([layer])[layer]
    R = p.missing()
    p.write(layer, p.solve(layer, R, K), K, R)


def spread(p: Pieces) -> None:
    for i, layer in enumerate(p.layers):
        K = p.keys_at([layer])[layer]
        missing = p.missing()
        p.write(layer, p.solve(layer, missing / (len(p.layers) - i), K), K, missing)


def joint(p: Pieces) -> None:
    K = p.keys_at(p.layers)
    missing = p.missing()
    for layer, dW in p.solve_joint(missing, K).items():
        p.write(layer, dW, K[layer], missing)


def cascade(p: Pieces) -> None:
    for i, layer in enumerate(p.layers):
        K = p.keys_at(p.layers[i:])
        missing = p.missing()
        p.write(layer, p.solve_joint(missing, K)[layer], K[layer], missing)


def refit(p: Pieces) -> None:
    hp = p.settings
    base = get_distribution(hp.refit_base)
    if base.name == "refit":
        raise HyperparameterError("refit_base must be another distribution than refit")
    start = before = float(p.missing().norm(dim=1).mean())
    for n in range(1, hp.refit_passes + 1):
        checkpoint = p.checkpoint() if n > 1 else None
        base.run(p)
        left = float(p.missing().norm(dim=1).mean())
        log.debug("refit pass %d: residual %.4g -> %.4g", n, before, left)
        if checkpoint is not None and left >= before:  # a pass that does not shrink the residual: undone, stop
            p.back_to(checkpoint)
            log.info("refit: pass %d left %.4g of the residual against %.4g before it; undone, %d pass(es) kept",
                     n, left, before, n - 1)
            break
        for layer in p.info:
            p.info[layer].update(passes=n, residual_left=left)
        before = left
        if left <= hp.refit_tol * start:
            break


register_distribution("single", single, "the last layer alone takes the whole residual")
register_distribution("spread", spread, "MEMIT's: each layer in turn takes an equal share of what is still missing")
register_distribution("joint", joint, "all layers solved as one problem, shares by capacity, one key pass")
register_distribution("cascade", cascade, "layer by layer, each taking its share of a joint solve over the layers left")
register_distribution("refit", refit, "passes of refit_base until the residual falls below refit_tol")
