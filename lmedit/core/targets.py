"""Target vectors: the ONE optimisation every method uses, batched over requests.

Example::

    result = compute_targets(model, tok, adapter, requests, templates, layer=8, config=TargetConfig())
    result.targets      # (B, d_model) float32: z* = z + delta for each request

For each request a vector delta is added to the output of block ``layer`` (the residual stream)
at the last subject token, and optimised so that the model says ``target_new`` after every context
template (loss as in MEMIT's ``compute_z``):

    loss_r = mean_t [ -sum_i log p(target_i | template_t(prompt), target_<i) / len(target) ]
             + kl_factor * KL(p_delta || p_0) at the subject's last token of "{subject} is a"
             + v_weight_decay * ||delta|| / ||init||^2

with Adam and ||delta|| clamped to clamp_norm_factor * ||init||. Requests that share a key (the same
tokens up to the subject's last one; ``share_key_targets``) share one delta: its loss is the mean of
theirs, for up to ``v_num_grad_steps`` steps per request. A request stops once its loss is
below early_stop_loss, or (``early_stop="most_probable"``, ENCORE's most-probable early stopping)
once target_new has been the most probable continuation, token by token (teacher forced), on all
of its prompts at ``mpes_extra_steps + 1`` steps (counted, as ENCORE does, not necessarily in a
row; ENCORE's Llama-2 setting is 2 extra steps); ``mpes_prompts="plain"`` reads only the prompts not
in the chat form, where target_new becomes the argmax far later (results/README.md, MPES). ``init`` is the block output (MEMIT/EMMET, ``anchor="block"``) or the MLP output (ROME,
``anchor="mlp"``) at that token in the bare prompt. Adding delta to the MLP output and to the block
output is the same operation for every supported architecture (the MLP is the last residual
branch of a block), so ROME and MEMIT share this code.

Why it is fast (the reference runs the whole model over every position, one request at a time):

* all requests of a chunk optimise together: the total loss is the sum of per-request losses,
  so each delta sees exactly the gradient it would see alone, and Adam runs per row;
* sequences are laid out so that every subject-last token sits in the same column S (see
  ``lmedit.core.layout``); columns before S never change (causal attention), so their keys and
  values are computed once and reused as a KV cache; each step runs only columns >= S;
* blocks 0..layer do not change either: their output at columns >= S is computed once, and each
  step resumes the forward pass at block layer+1 from it;
* logits are computed only where the loss needs them, not over the vocabulary at every position;
* requests that stopped leave the batch, and those left are laid out anew (passes and widths for
  them alone: with MPES the last requests of a chunk would otherwise pay for everyone's padding).
"""

from __future__ import annotations

import bisect
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from lmedit.chat import is_chat_form
from lmedit.config import Config, param
from lmedit.core.hfcompat import KV, attention_impl, cache_kwarg, cache_to_kv, frozen, make_cache, only_blocks_after
from lmedit.core.layout import TargetLayout, build_layout, buckets
from lmedit.core.tokens import encode_subject_prompts
from lmedit.errors import RequestError, SolveError
from lmedit.hooks import ReplaceInput, Trace
from lmedit.models.adapters import ModelAdapter
from lmedit.models.precision import COMPUTE_DTYPES, model_device, module_device
from lmedit.requests import EditRequest

log = logging.getLogger(__name__)
ANCHORS = ("block", "mlp")


@dataclass(frozen=True)
class TargetConfig(Config):
    """Hyperparameters of the target-vector optimisation (names as in the reference code)."""

    v_num_grad_steps: int = param(25, "Adam steps (the last computes the loss only, as in the reference)", min=1)
    v_lr: float = param(0.5, "Adam learning rate", gt=0)
    v_weight_decay: float = param(0.5, "weight of ||delta|| / ||init||^2 in the loss", min=0)
    clamp_norm_factor: float = param(0.75, "||delta|| <= clamp_norm_factor * ||init||", gt=0)
    kl_factor: float = param(0.0625, "weight of KL(p_delta || p_0) on '{subject} is a'", min=0)
    early_stop_loss: float = param(0.05, "a request stops once its loss is below this")
    early_stop: str = param("loss", "stopping rule: 'loss' (loss below early_stop_loss) or 'most_probable' "
                            "(ENCORE's MPES: also stop once target_new is the argmax on all prompts)",
                            choices=("loss", "most_probable"))
    mpes_extra_steps: int = param(2, "with early_stop='most_probable': a request stops at the (n+1)-th step "
                                  "at which target_new is the argmax on all its prompts", min=0)
    mpes_prompts: str = param("all", "with early_stop='most_probable': the prompts on which target_new must be the "
                              "argmax: 'all', or 'plain' (not those in the chat form, which reach it late; they are "
                              "still optimised)", choices=("all", "plain"))
    share_key_targets: bool = param(True, "requests of one edit whose keys are the same (the same tokens up to the "
                                    "subject's last one, e.g. two relations of a subject whose prompts begin with it) "
                                    "get one target vector, optimised for all of their facts (for up to v_num_grad_steps "
                                    "per fact); alone, each gets its own and the edit writes a compromise at the one key "
                                    "that neither fact's target_new wins (results/README.md, 'Two facts read from one "
                                    "key'). With preserve_edits and supersede_edits, earlier edited facts of a request's "
                                    "key are edited again with it")
    chunk_requests: int = param(0, "requests optimised together; 0: all up to 256 on a CUDA device, else 64 (either "
                                "split further to fit the memory budget)", min=0)
    compute_dtype: str = param("model", "dtype of the optimisation's forward passes; 'auto': bfloat16 where its "
                               "matmuls are native (a bf16 copy of the model), else the model's", choices=COMPUTE_DTYPES)

    def target_settings(self) -> dict:
        """The values target vectors depend on (chunking does not change them). ``mpes_prompts`` is named
        only where it acts: not 'all' (how every vector was computed before it existed, so vectors
        saved then still compare equal), with the most-probable stop. ``share_key_targets`` is not named: it
        acts only where requests share a key, which the vectors' provenance records (``shared_keys``)."""
        return {f: getattr(self, f) for f in TargetConfig.field_names()
                if f not in ("chunk_requests", "share_key_targets")
                and not (f == "mpes_prompts" and not self.stop_reads_plain_only)}

    @property
    def stop_reads_plain_only(self) -> bool:
        """Whether the stop reads the argmax of the plain prompts alone (``mpes_prompts`` acts)."""
        return self.early_stop == "most_probable" and self.mpes_prompts == "plain"


_TENSORS = ("targets", "init", "delta", "loss", "steps", "target_prob")  # the per-request tensors of a TargetResult


@dataclass
class TargetResult:
    """Per request: z* and what it was built from, plus what it was computed from (provenance)."""

    targets: torch.Tensor  # (B, d) float32, z* = z + delta: the block output the edit should produce
    init: torch.Tensor  # (B, d) float32, the anchor output delta's norm is measured against
    delta: torch.Tensor  # (B, d) float32
    loss: torch.Tensor  # (B,) final loss per request
    steps: torch.Tensor  # (B,) optimisation steps taken
    target_prob: torch.Tensor  # (B,) exp(-nll) of target_new at the end
    stats: dict = field(default_factory=dict)
    # what the vectors were computed from (layer, settings, templates, requests, weights state), so
    # that Editor.edit(targets=...) can refuse to reuse them for anything else
    provenance: dict = field(default_factory=dict)
    # (B, d) float32 v* = v0 + delta: the MLP output of the target layer at the subject's last token (bare
    # prompt) that the target asks for, v0 that output on the weights the targets were computed on; None
    # where a post-MLP norm sits between the two (Gemma 2/3) and in files written before it was kept
    value: torch.Tensor | None = None

    def part(self, start: int, stop: int) -> "TargetResult":
        """The vectors of requests ``start:stop`` (e.g. one batch's share of a larger computation), copied."""
        return self.select(range(len(self.targets))[start:stop])

    def select(self, indices: Sequence[int]) -> "TargetResult":
        """The vectors of the requests at ``indices``, in that order (e.g. a batch whose records were
        reordered out of a larger precomputed set)."""
        idx = [int(i) for i in indices]
        n = len(self.targets)
        if any(not -n <= i < n for i in idx):
            raise IndexError(f"select: an index is out of range for {n} requests")
        prov = dict(self.provenance)
        if "requests" in prov:
            reqs = list(prov["requests"])
            prov["requests"] = [reqs[i] for i in idx]
        if "shared_keys" in prov:  # a group keeps its selected members; one partly left out stays named (its
            # vector was optimised with facts this selection lacks), so an edit of these requests refuses it
            new_at: dict[int, list[int]] = {}
            for new, old in enumerate(idx):
                new_at.setdefault(old % n, []).append(new)
            groups = canonical_groups([[p for m in g for p in new_at.get(m, [])] for g in prov.pop("shared_keys")])
            if groups:
                prov["shared_keys"] = groups
        at = torch.tensor(idx, dtype=torch.long)
        return TargetResult(**{k: getattr(self, k)[at] for k in _TENSORS}, stats=dict(self.stats),
                            provenance=prov, value=None if self.value is None else self.value[at])

    @classmethod
    def concat(cls, parts: Sequence["TargetResult"]) -> "TargetResult":
        """One result for consecutive chunks (or consecutive requests), in order."""
        if len(parts) == 1:
            return parts[0]
        cat = {k: torch.cat([getattr(p, k) for p in parts]) for k in _TENSORS}
        cat["value"] = None if any(p.value is None for p in parts) else torch.cat([p.value for p in parts])
        prov = {}
        bare = [{k: v for k, v in p.provenance.items() if k != "shared_keys"} for p in parts]
        if all(b == {**bare[0], "requests": b.get("requests")} for b in bare):
            prov = {**bare[0], "requests": [k for b in bare for k in b.get("requests", [])]}
            offsets = [sum(len(q.targets) for q in parts[:i]) for i in range(len(parts))]
            shared = [[m + off for m in g] for p, off in zip(parts, offsets) for g in p.provenance.get("shared_keys", [])]
            if shared:
                prov["shared_keys"] = shared
        return cls(**cat, stats={"forward_tokens": sum(p.stats.get("forward_tokens", 0) for p in parts)},
                   provenance=prov)


TARGETS_FORMAT = "lmedit-targets"
TARGETS_FORMAT_VERSION = 1


def write_targets(path, result: TargetResult, provenance: dict) -> None:
    """Write ``result``'s tensors and ``provenance`` (JSON values) as one safetensors file, atomically."""
    from safetensors.torch import save_file

    from lmedit._fs import atomic_path
    from lmedit._version import __version__

    meta = {"format": TARGETS_FORMAT, "format_version": str(TARGETS_FORMAT_VERSION), "lmedit_version": __version__,
            "provenance": json.dumps(provenance), "stats": json.dumps(result.stats)}
    with atomic_path(path) as tmp:
        names = _TENSORS + (("value",) if result.value is not None else ())
        save_file({k: getattr(result, k).detach().cpu().contiguous() for k in names}, str(tmp), metadata=meta)


def read_targets(path) -> tuple[TargetResult, dict]:
    """(result without provenance, the provenance written with it) of a targets file; CacheError if
    the file is missing, unreadable, truncated, of another format or of an unknown format version."""
    from lmedit._fs import read_safetensors
    from lmedit.errors import CacheError

    path = Path(path)
    meta, tensors = read_safetensors(path, "targets file")
    if meta.get("format") != TARGETS_FORMAT:
        raise CacheError(f"{path} is not an lmedit targets file (no 'format: {TARGETS_FORMAT}' metadata)")
    if meta.get("format_version") != str(TARGETS_FORMAT_VERSION):
        raise CacheError(f"targets file {path} has format version {meta.get('format_version')}, this lmedit reads "
                         f"{TARGETS_FORMAT_VERSION}; compute the targets afresh")
    missing = [k for k in _TENSORS if k not in tensors]
    n = {tensors[k].shape[0] for k in (*_TENSORS, "value") if k in tensors}
    if missing or len(n) != 1:
        raise CacheError(f"targets file {path} is corrupt (missing {missing} or rows that do not agree)")
    try:
        provenance, stats = json.loads(meta["provenance"]), json.loads(meta.get("stats", "{}"))
    except (KeyError, ValueError) as e:
        raise CacheError(f"targets file {path} has unreadable metadata ({e})") from e
    if len(provenance.get("requests", [])) != n.pop():
        raise CacheError(f"targets file {path} is corrupt: its vectors and its requests differ in number")
    provenance["requests"] = [tuple(r) for r in provenance["requests"]]
    return TargetResult(**{k: tensors[k] for k in _TENSORS}, stats=stats, value=tensors.get("value")), provenance


def canonical_groups(groups: Sequence[Sequence[int]]) -> list[list[int]]:
    """Groups of request indices, each sorted, ordered by their first member, empty ones dropped."""
    return sorted((sorted(int(m) for m in g) for g in groups if len(g)), key=lambda g: g[0])


def shared_key_groups(tokenizer, requests: Sequence[EditRequest]) -> list[int]:
    """Per request, the index of its key group (numbered in order of first appearance): requests whose
    bare prompts read the same tokens up to the subject's last one share a key (the MLP input there, also
    after any context template), e.g. "{} was born in" and "{} plays", both about one subject."""
    if not requests:
        return []
    seqs = encode_subject_prompts(tokenizer, [r.prompt for r in requests], [r.subject for r in requests])
    first: dict[tuple[int, ...], int] = {}
    return [first.setdefault(tuple(s.ids[:s.subject_last + 1]), len(first)) for s in seqs]


def shared_keys(tokenizer, requests: Sequence[EditRequest]) -> list[list[int]]:
    """The indices of requests that share a key, one list per key shared by two or more (see
    :func:`shared_key_groups`); empty where every key is a request's own."""
    members: dict[int, list[int]] = {}
    for i, g in enumerate(shared_key_groups(tokenizer, requests)):
        members.setdefault(g, []).append(i)
    return canonical_groups([m for m in members.values() if len(m) > 1])


def key_order(tokenizer, requests: Sequence[EditRequest], share: bool) -> tuple[list[int], list[int]]:
    """(order, group): an order of ``requests`` in which those sharing a key (``share``) are adjacent, each
    group at its first member's place, and the key group of each request in that order (``share``
    False, or no key shared: the identity and one group per request)."""
    group = shared_key_groups(tokenizer, requests) if share else list(range(len(requests)))
    order = sorted(range(len(requests)), key=lambda i: group[i])  # stable: members keep their order
    return order, [group[i] for i in order]


def reference_norm(values: torch.Tensor, upper_quantile: float = 0.95) -> float:
    """The mean norm of value vectors v* (rows of ``values``) without the largest ``1 - upper_quantile``
    share: Norm-Anchor Scaling's reference, measured on the unedited model."""
    norms = values.double().norm(dim=1).sort().values
    drop = int((1.0 - upper_quantile) * len(norms))
    return float(norms[:len(norms) - drop].mean())


def anchor_norms(result: TargetResult, reference: float) -> TargetResult:
    """``result`` with each value vector rescaled to norm ``reference`` (Norm-Anchor Scaling, Liu et al.
    2026): v*' = v* reference / ||v*||, and the target moved by the same change, z*' = z* + v*' - v*.
    In sequential editing, edited weights make v0, and with it v*, grow batch after batch, and larger
    targets make larger updates; anchoring every v* to a norm of the unedited model breaks that loop.
    Idempotent: anchored vectors already have the reference norm. ``delta`` stays the optimised shift
    (so z* = z0 + delta no longer holds once rescaled)."""
    if result.value is None:
        raise ValueError("these target vectors carry no value vectors v* (a block with a post-MLP norm, or a file "
                         "written by an older lmedit)")
    if not reference > 0:
        raise ValueError(f"the reference norm must be positive, got {reference}")
    v = result.value.float()
    scaled = v * (reference / v.norm(dim=1, keepdim=True).clamp_min(1e-12))
    return replace(result, targets=result.targets + (scaled - v), value=scaled)


def compute_targets(
    model: nn.Module,
    tokenizer,
    adapter: ModelAdapter,
    requests: Sequence[EditRequest],
    templates: Sequence[str],
    layer: int,
    config: TargetConfig,
    *,
    anchor: str = "block",
    progress: bool = False,
    budget: int | None = None,
) -> TargetResult:
    """Optimise one target vector per request at block ``layer`` (see the module docstring).

    ``budget``: bytes the optimisation may allocate; chunks estimated above it are split (see
    :func:`plan_chunks`; the vectors do not depend on the chunking).

    ``model`` is the model the optimisation runs on, already in the compute dtype (see
    ``lmedit.models.precision.working_copy``); ``templates[0]`` must be ``"{}"``.
    """
    from tqdm.auto import tqdm

    if anchor not in ANCHORS:
        raise ValueError(f"anchor must be one of {ANCHORS}, got {anchor!r}")
    parts = []
    order, group = key_order(tokenizer, requests, config.share_key_targets)
    ordered = [requests[i] for i in order]
    chunks = plan_chunks(model, tokenizer, adapter, ordered, templates, layer, config.chunk_requests, budget,
                         groups=group)
    with tqdm(total=len(requests), desc="target vectors", unit="req", disable=not progress) as bar:
        for start, stop in chunks:
            parts.append(_optimise_chunk(model, tokenizer, adapter, ordered[start:stop], templates, layer, config,
                                         anchor, group[start:stop]))
            bar.update(stop - start)
    result = TargetResult.concat(parts)
    if order != sorted(order):  # back to the requests' own order
        back = [0] * len(order)
        for at, i in enumerate(order):
            back[i] = at
        result = result.select(back)
    return result


def estimate_bytes(model: nn.Module, adapter: ModelAdapter, lay: TargetLayout, layer: int) -> int:
    """Estimated peak bytes the optimisation of one chunk laid out as ``lay`` allocates on ``model``
    (in its compute dtype): the prefix KV cache of every layer (and its per-bucket selection), the
    block outputs kept at the suffix columns, one forward and backward pass of every row through
    blocks ``layer + 1``.. (each block's saved activations: about 12 hidden-width, 4 MLP-width and
    2 KV-width vectors per token, and the attention probabilities), and the logits the loss reads.
    Checked against measured peak memory by ``benchmarks/memory.py``."""
    cfg = getattr(model, "config", None)
    b = next(model.parameters()).element_size()
    d_out, d_in = adapter.weight(model, layer).shape
    d, d_mlp = int(d_out), int(d_in)  # the edited projection maps the MLP width back to the hidden width
    heads = int(getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None) or 1)
    head_dim = int(getattr(cfg, "head_dim", None) or d // heads)
    kv_dim = int(getattr(cfg, "num_key_value_heads", None) or heads) * head_dim
    vocab = int(adapter.unembed_module(model).weight.shape[0])
    n_layers = adapter.n_layers(model)
    N, W = lay.ids.shape
    S, T = lay.S, W - lay.S
    prefix_kv = 2 * n_layers * N * S * 2 * kv_dim * b
    kept = N * T * d * b
    per_token = (12 * d + 4 * d_mlp + 2 * kv_dim + 2 * heads * (S + T)) * b
    steps = (n_layers - layer - 1) * N * T * per_token
    logits = (lay.loss_tok.numel() + int(lay.is_kl.sum())) * vocab * 4 * 4
    return int(prefix_kv + kept + steps + logits)


def resume_module(model: nn.Module, adapter: ModelAdapter, layer: int) -> nn.Module:
    """The module the optimisation's passes resume at after block ``layer``: the next block, or the
    final norm after the last."""
    last = layer + 1 >= adapter.n_layers(model)
    return adapter.final_norm_module(model) if last else adapter.block(model, layer + 1)


def passes_device(model: nn.Module, adapter: ModelAdapter, layer: int) -> torch.device:
    """Where the optimisation's passes after block ``layer`` run: the device of the module they resume
    at, or of the head where that is a norm without weights."""
    try:
        return module_device(resume_module(model, adapter, layer))
    except StopIteration:
        return module_device(adapter.unembed_module(model))


#: requests optimised together on a CUDA device when ``chunk_requests`` is 0, at most (one chunk of 100
#: measured; :func:`estimate_bytes` was checked against peak memory on a CPU only, so bound the risk)
CUDA_CHUNK = 256


def default_chunk(device: torch.device | str | None, n_requests: int) -> int:
    """How many requests to optimise together when ``chunk_requests`` is 0: on CUDA all of them up to
    :data:`CUDA_CHUNK` (a step there costs mostly kernel launches, about as much for 100 requests as
    for 64, so fewer chunks mean fewer steps: see :data:`lmedit.core.layout.PASS_TOKENS`); elsewhere
    64, where a chunk's cost grows with its rows. :func:`plan_chunks` splits either to fit the budget."""
    kind = "cpu" if device is None else torch.device(device).type
    return max(1, min(n_requests, CUDA_CHUNK)) if kind == "cuda" else 64


def plan_chunks(model: nn.Module, tokenizer, adapter: ModelAdapter, requests: Sequence[EditRequest],
                templates: Sequence[str], layer: int, chunk_requests: int, budget: int | None,
                groups: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """(start, stop) of the chunks of requests optimised together: ``chunk_requests`` at a time
    (0: :func:`default_chunk` for :func:`passes_device`), halved where a chunk's
    :func:`estimate_bytes` exceeds ``budget`` (None: no bound). ``groups`` (one per request, equal for
    adjacent requests that share a target vector; see :func:`key_order`): a chunk never splits a
    group, so it ends at the first group boundary from its size on. A request (or group) that does not
    fit alone is refused before any work, naming it, its estimate and the budget."""
    n = len(requests)
    chunk_requests = chunk_requests or default_chunk(passes_device(model, adapter, layer), n)
    cuts = list(range(n + 1)) if groups is None else [0] + [i for i in range(1, n) if groups[i] != groups[i - 1]] + [n]
    out, todo, start = [], [], 0
    while start < n:  # the first cut at or after start + chunk_requests
        stop = cuts[bisect.bisect_left(cuts, min(start + chunk_requests, n))]
        todo.append((start, stop))
        start = stop
    while todo:
        start, stop = todo.pop(0)
        if budget is None:
            out.append((start, stop))
            continue
        need = estimate_bytes(model, adapter, build_layout(tokenizer, requests[start:stop], templates), layer)
        inner = cuts[bisect.bisect_right(cuts, start):bisect.bisect_left(cuts, stop)]  # cuts strictly inside
        if need <= budget:
            out.append((start, stop))
        elif inner:
            mid = min(inner, key=lambda c: abs(c - (start + stop) // 2))
            todo[:0] = [(start, mid), (mid, stop)]
        else:
            r = requests[start]
            what = (f"request {r.case_id if r.case_id is not None else start} ({r.subject!r})" if stop - start == 1 else
                    f"the {stop - start} requests sharing the key of {r.subject!r} (one target vector)")
            raise RequestError(f"{what}: its target optimisation needs about {need / 2**30:.2f} GiB with "
                               f"{len(templates)} context templates, more than the memory budget of "
                               f"{budget / 2**30:.2f} GiB (set LMEDIT_MEMORY_BUDGET, --memory-budget or "
                               "Editor(memory_budget=) higher, or use fewer context templates)")
    if budget is not None and len(out) > -(-len(requests) // chunk_requests):
        log.info("target optimisation in %d chunks (memory budget %.2f GiB)", len(out), budget / 2**30)
    return out


@dataclass
class _Prefix:
    """What the optimisation reads from the unedited pass, computed once per chunk."""

    kv: KV | None  # keys/values of the prefix columns [0, S) of every layer, or None when S == 0
    h_suffix: torch.Tensor  # (N, W - S, d) output of block ``layer`` at the suffix columns
    z0: torch.Tensor  # (B, d) float32 block output at the subject-last column of the bare prompts
    init: torch.Tensor  # (B, d) float32 anchor output there (the MLP's where delta is added to it)
    tokens: int  # tokens run through the model
    o_s: torch.Tensor | None = None  # (N, d) MLP output at column S, where a post-MLP norm follows it
    o_plain: torch.Tensor | None = None  # (B, d) the same at the bare prompts' rows
    v0: torch.Tensor | None = None  # (B, d) float32 MLP output at the subject-last column of the bare prompts


@torch.no_grad()
def _prefix_pass(model: nn.Module, adapter: ModelAdapter, lay: TargetLayout, layer: int, anchor: str) -> _Prefix:
    decoder = adapter.decoder(model)
    S, kv, tokens = lay.S, None, 0
    if S > 0:  # 1) prefix columns [0, S): keys/values of every layer, computed once
        # a plain cache keeps every layer's full KV (the model's own would crop sliding-window layers,
        # whose masks the resumed passes could then not line up); the sliding mask still applies
        out = decoder(input_ids=lay.ids[:, :S], attention_mask=lay.mask[:, :S], position_ids=lay.pos[:, :S],
                      use_cache=True, **{cache_kwarg(decoder): make_cache([])})
        kv, tokens = cache_to_kv(out), lay.ids[:, :S].numel()
    # 2) suffix columns [S, W) through blocks 0..layer, once: their outputs never change
    kwargs = {} if kv is None else {cache_kwarg(decoder): make_cache(kv)}
    mods = {"block": adapter.block(model, layer), "mlp": adapter.mlp_module(model, layer)}
    with Trace(mods, capture="output", stop=True) as tr:
        decoder(input_ids=lay.ids[:, S:], attention_mask=lay.mask, position_ids=lay.pos[:, S:],
                use_cache=kv is not None, **kwargs)
    out = tr.outputs
    plain = lay.plain_rows.to(out["block"].device)
    pre = _Prefix(kv=kv, h_suffix=out["block"], z0=out["block"][plain, 0].float(),
                  init=out[anchor][plain.to(out[anchor].device), 0].float(), tokens=tokens + lay.ids[:, S:].numel(),
                  v0=out["mlp"][plain.to(out["mlp"].device), 0].float())
    if adapter.post_mlp_norm is not None and anchor == "mlp":  # ROME's v*: delta goes into the MLP output,
        # before the block's post-MLP norm (a change the norm lets through; see _post_norm_shift)
        pre.o_s = out["mlp"][:, 0].float()
        pre.o_plain = pre.o_s[plain.to(pre.o_s.device)]
        pre.init = pre.o_plain
    return pre


def _post_norm_shift(norm: nn.Module, o: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """norm(o + delta) - norm(o): what a delta of the MLP output adds to the residual stream through
    a post-MLP norm (float32; differentiable in delta)."""
    return norm(o + delta).float() - norm(o).float()


@dataclass
class _StepOutput:
    nll: torch.Tensor  # (A,) weighted target NLL per active request
    kl_logp: torch.Tensor  # (A, V) log-probs at the KL prompt's subject-last token
    argmax_ok: torch.Tensor  # (A,) bool: every target token is the argmax on every prompt


class _Resumed:
    """Forward passes of the suffix columns from block ``layer + 1`` on, with delta added at column S."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter, lay: TargetLayout, pre: _Prefix, layer: int):
        self.model, self.adapter, self.lay, self.pre, self.layer = model, adapter, lay, pre, layer
        self.decoder = adapter.decoder(model)
        self.unembed = adapter.unembed_module(model)
        self.out_device = module_device(self.unembed)  # where the loss terms are computed (the head's device)
        self.post_norm = (adapter.resolve(adapter.block(model, layer), adapter.post_mlp_norm)
                          if pre.o_s is not None else None)
        self.ckw = cache_kwarg(self.decoder)
        self.resume_at = resume_module(model, adapter, layer)
        self.passes_on = passes_device(model, adapter, layer)
        self.buckets = buckets(lay, device=self.passes_on)
        self._laid_out = torch.ones(lay.ids.shape[0], dtype=torch.bool, device=lay.ids.device)  # sequences in buckets
        self._kv: dict[int, KV | None] = {}  # per bucket of the current layout: its rows' prefix KV
        self.tokens = 0

    def _bucket_kv(self, b: int, rows: torch.Tensor) -> KV | None:
        """The prefix KV of bucket ``b``'s ``rows`` (selected once per layout: a new one clears them)."""
        if b not in self._kv:
            self._kv[b] = None if self.pre.kv is None else [(k[rows.to(k.device)], v[rows.to(v.device)])
                                                            for k, v in self.pre.kv]
        return self._kv[b]

    def _hidden(self, rows: torch.Tensor, width: int, delta_rows: torch.Tensor, kv: KV | None) -> torch.Tensor:
        """(n, width, d) final-norm output of ``rows``, with ``delta_rows`` (n, d) added at column S."""
        S, lay = self.lay.S, self.lay
        h = self.pre.h_suffix[rows.to(self.pre.h_suffix.device), :width]
        add = delta_rows.to(h.device)
        if self.post_norm is not None:  # delta is a change of the MLP output; the norm sits between
            add = _post_norm_shift(self.post_norm, self.pre.o_s[rows.to(self.pre.o_s.device)], add)
        h0 = (h[:, 0].float() + add).to(h.dtype)
        h = torch.cat([h0[:, None], h[:, 1:]], dim=1)
        kwargs = {} if kv is None else {self.ckw: make_cache(kv)}
        # blocks 0..layer are cut out; the pass resumes at block layer+1 (or at the final norm when
        # ``layer`` is the last block) from the cached, edited hidden state
        with only_blocks_after(self.adapter, self.model, self.layer), ReplaceInput(self.resume_at, h):
            out = self.decoder(input_ids=lay.ids[rows, S:S + width], attention_mask=lay.mask[rows, :S + width],
                               position_ids=lay.pos[rows, S:S + width], use_cache=kv is not None, **kwargs)
        self.tokens += rows.numel() * width
        return out.last_hidden_state.to(self.out_device)

    def step(self, delta: torch.Tensor, act_req: torch.Tensor, active: torch.Tensor) -> _StepOutput:
        """Losses of the active requests ``act_req`` (A,) with their deltas ``delta`` (A, d)."""
        # index bookkeeping on the layout's device, loss terms on the head's (a split model may differ)
        lay, B, dev, out_dev = self.lay, active.shape[0], self.lay.ids.device, self.out_device
        active, act_idx = active.to(dev), act_req.to(dev)
        local = torch.full((B,), -1, dtype=torch.long, device=dev)
        local[act_idx] = torch.arange(len(act_idx), device=dev)  # request -> row of delta
        seq_active = active[lay.req]
        if not torch.equal(seq_active, self._laid_out):  # requests stopped: lay out the rest anew
            self.buckets, self._laid_out, self._kv = buckets(lay, device=self.passes_on, among=seq_active), seq_active, {}
        nll = torch.zeros(len(act_req), device=out_dev)
        wrong = torch.zeros(len(act_req), device=out_dev)
        kl_logp = torch.zeros(len(act_req), self.unembed.weight.shape[0], device=out_dev)
        for b, bucket in enumerate(self.buckets):
            rows = bucket.seqs  # laid out over the active sequences only
            seq_req = local[lay.req[rows]]  # (n,) row of delta for each sequence
            hidden = self._hidden(rows, bucket.width, delta[seq_req.to(delta.device)], self._bucket_kv(b, rows))
            nll, wrong = self._target_terms(hidden, rows, bucket.entries, seq_req, nll, wrong)
            is_kl = lay.is_kl[rows]
            if bool(is_kl.any()):
                logits = self.unembed(hidden[is_kl.to(out_dev), 0]).float()
                kl_logp = kl_logp.index_copy(0, seq_req[is_kl].to(out_dev), torch.log_softmax(logits, -1))
        to = delta.device
        return _StepOutput(nll.to(to), kl_logp.to(to), (wrong == 0).to(to))

    def _target_terms(self, hidden, rows, entries, seq_req, nll, wrong):
        """Add the target-token NLL (and count wrong argmaxes) of the loss entries read by ``rows``."""
        lay, dev, out = self.lay, self.lay.ids.device, hidden.device
        row_of = torch.full((lay.ids.shape[0],), -1, dtype=torch.long, device=dev)
        row_of[rows] = torch.arange(len(rows), device=dev)  # sequence -> row of hidden
        e = entries[row_of[lay.loss_rows[entries]] >= 0]  # the entries of active sequences
        if e.numel() == 0:
            return nll, wrong
        r = row_of[lay.loss_rows[e]]
        logits = self.unembed(hidden[r.to(out), (lay.loss_cols[e] - lay.S).to(out)]).float()  # (M, V)
        logp = torch.log_softmax(logits, -1)
        tok = lay.loss_tok[e].to(out)
        tok_lp = logp.gather(1, tok[:, None]).squeeze(1)
        miss = ((logits.detach().argmax(-1) != tok) & lay.loss_counted[e].to(out)).float()
        where = seq_req[r].to(out)
        return nll.index_add(0, where, -tok_lp * lay.loss_w[e].to(out)), wrong.index_add(0, where, miss)


class _RowAdam:
    """Adam on the rows of a (B, d) tensor, each row with its own step count, projected into a ball."""

    def __init__(self, like: torch.Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.lr, (self.b1, self.b2), self.eps = lr, betas, eps
        self.m = torch.zeros_like(like)  # (B, d) first moments
        self.v = torch.zeros_like(like)  # (B, d) second moments
        self.t = torch.zeros(like.shape[0], dtype=torch.long, device=like.device)  # steps taken per row

    def step(self, value: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor, max_norm: torch.Tensor) -> None:
        """value[rows] <- Adam step with ``grad`` (n, d), then scaled into ||value[rows]|| <= max_norm (n,)."""
        self.t[rows] += 1
        t = self.t[rows, None].double()
        self.m[rows] = self.b1 * self.m[rows] + (1 - self.b1) * grad
        self.v[rows] = self.b2 * self.v[rows] + (1 - self.b2) * grad ** 2
        m_hat = self.m[rows] / (1 - self.b1 ** t).float()
        v_hat = self.v[rows] / (1 - self.b2 ** t).float()
        new = value[rows] - self.lr * m_hat / (v_hat.sqrt() + self.eps)
        scale = torch.clamp(max_norm[:, None] / new.norm(dim=1, keepdim=True).clamp_min(1e-12), max=1.0)
        value[rows] = new * scale


def _stopped(config: TargetConfig, loss: torch.Tensor, hits: torch.Tensor) -> torch.Tensor:
    """(A,) bool: which active requests stop now. ``hits`` (A,): steps so far (this one included) at which
    target_new was the argmax on every prompt."""
    done = loss < config.early_stop_loss
    if config.early_stop == "most_probable":
        done |= hits > config.mpes_extra_steps
    return done


def _counted(tokenizer, templates: Sequence[str], config: TargetConfig) -> list[bool] | None:
    """Per template, whether the most-probable stop reads its argmax (None: every template)."""
    if not config.stop_reads_plain_only:
        return None
    chat = is_chat_form(tokenizer)
    return [not chat(t) for t in templates]


def _group_rows(groups: Sequence[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gid, first, size) of a chunk's key groups: per request (B,) its group's row of delta, numbered in
    order of the group ids; per group (G,) its first request and its number of requests."""
    gid = torch.unique(torch.as_tensor(list(groups)), return_inverse=True)[1].to(device)
    B, G = len(gid), int(gid.max()) + 1
    first = torch.full((G,), B, dtype=torch.long, device=device).scatter_reduce(
        0, gid, torch.arange(B, device=device), "amin")
    return gid, first, torch.zeros(G, dtype=torch.long, device=device).index_add(0, gid, torch.ones_like(gid))


def _optimise_chunk(model, tokenizer, adapter: ModelAdapter, requests: Sequence[EditRequest],
                    templates: Sequence[str], layer: int, config: TargetConfig, anchor: str,
                    groups: Sequence[int]) -> TargetResult:
    """One chunk's vectors. ``groups`` (one per request): requests of one group share a key, so one delta
    (a row of ``delta``) serves them all; its loss is the mean of theirs, and it stops once each of
    them would stop alone (its members' worst loss, steps at which every member's target is the argmax),
    or after ``v_num_grad_steps`` per member (the steps they would have had alone: one vector for two
    facts needs more than one for one; results/README.md, "Two facts read from one key").
    With one request per group this is each request's own optimisation, bit for bit."""
    device = model_device(model)
    lay = build_layout(tokenizer, requests, templates, _counted(tokenizer, templates, config)).to(device)
    B = len(requests)
    with frozen(model):
        pre = _prefix_pass(model, adapter, lay, layer, anchor)
    run = _Resumed(model, adapter, lay, pre, layer)
    at = pre.init.device  # the per-request bookkeeping lives with delta
    gid, first, size = _group_rows(groups, at)
    G = len(first)
    delta = torch.zeros_like(pre.init[first])  # (G, d) float32, on the device of block ``layer`` (where it is added)
    adam = _RowAdam(delta, config.v_lr)
    init_norm = pre.init.norm(dim=1)  # (B,): members of a group share their anchor output
    active = torch.ones(B, dtype=torch.bool, device=at)
    loss_out = torch.full((B,), float("nan"), device=at)
    prob_out = torch.zeros(B, device=at)
    steps = torch.zeros(B, dtype=torch.long, device=at)
    hits = torch.zeros(G, dtype=torch.long, device=at)  # steps at which target_new was the argmax everywhere
    last = config.v_num_grad_steps * size - 1  # per group: its last step (the loss only, as in the reference)
    kl_init = None
    with frozen(model), attention_impl(model, "eager" if device.type == "cpu" else None):
        for it in range(int(last.max()) + 1):
            act = torch.nonzero(active).squeeze(1)
            gact, pos = torch.unique(gid[act], return_inverse=True)  # active groups; request -> row among them
            delta_p = delta[gact].clone().requires_grad_(True)  # (Ga, d)
            d_req = delta_p[pos]  # (A, d): each request reads its group's delta
            out = run.step(d_req, act, active)
            kl_init = out.kl_logp.detach().clone() if kl_init is None else kl_init  # every request is active at step 0
            kl = config.kl_factor * (out.kl_logp.exp() * (out.kl_logp - kl_init[act])).sum(-1)  # KL(p_delta || p_0)
            loss = out.nll + kl + config.v_weight_decay * d_req.norm(dim=1) / init_norm[act] ** 2  # (A,)
            loss_out[act], prob_out[act], steps[act] = loss.detach(), torch.exp(-out.nll.detach()), it
            zeros = torch.zeros(len(gact), device=at)
            missed = zeros.index_add(0, pos, (~out.argmax_ok).float())  # members whose target is not the argmax
            hits[gact] += (missed == 0).long()
            worst = zeros.scatter_reduce(0, pos, loss.detach(), "amax", include_self=False)
            done = _stopped(config, worst, hits[gact]) | (last[gact] == it)  # (Ga,)
            if bool(done.all()):
                break
            (zeros.index_add(0, pos, loss) / size[gact]).sum().backward()  # each group: the mean of its members' losses
            adam.step(delta, gact[~done], delta_p.grad[~done], config.clamp_norm_factor * init_norm[first[gact[~done]]])
            active[act[done[pos]]] = False
    return _chunk_result(requests, adapter, pre, run, delta[gid], loss_out, steps, prob_out)


def _chunk_result(requests, adapter: ModelAdapter, pre: _Prefix, run: _Resumed, delta: torch.Tensor,
                  loss: torch.Tensor, steps: torch.Tensor, prob: torch.Tensor) -> TargetResult:
    """A chunk's result from each request's optimised ``delta`` (B, d); refuses non-finite vectors."""
    if not torch.isfinite(delta).all():
        bad = [requests[i].case_id for i in torch.nonzero(~torch.isfinite(delta).all(1)).squeeze(1).tolist()]
        raise SolveError(f"target optimisation produced non-finite vectors for requests {bad}")
    z_delta = delta
    if run.post_norm is not None:
        with torch.no_grad():
            z_delta = _post_norm_shift(run.post_norm, pre.o_plain, delta)
    return TargetResult(targets=(pre.z0 + z_delta).cpu(), init=pre.init.cpu(), delta=delta.cpu(), loss=loss.cpu(),
                        steps=(steps + 1).cpu(), target_prob=prob.cpu(),
                        stats={"forward_tokens": pre.tokens + run.tokens},
                        value=None if adapter.post_mlp_norm is not None else (pre.v0.to(delta.device) + delta).cpu())
