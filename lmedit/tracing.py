"""Causal tracing (ROME, Meng et al. 2022): where in the network a model recalls a fact.

Example::

    facts = lmedit.load_facts("../shared/data/knowns/known_1209.json", limit=100)
    result = lmedit.trace(model, tok, facts)            # or: lmedit trace --data FILE --out DIR
    result.suggested_layers                             # e.g. [3, 4, 5, 6, 7]

For each fact the subject's token embeddings are corrupted with Gaussian noise (standard deviation
``noise`` times that of the subjects' token embeddings; ROME uses 3), ``samples`` times. Then the
clean value of one internal state is restored in the corrupted run, and the probability of the
answer the model gives on the clean prompt is read at the last token. The indirect effect of that
state is P(restored) - P(corrupted), averaged over noise samples and facts. States: the hidden state
(block output) of each layer at each token; and, separately, the MLP outputs and the attention
outputs of a window of ``window`` layers around each layer (ROME's figure uses 10).
``positions="last_subject"`` restores at the last subject token only: the row of ROME's figure that
the layer suggestion reads, at a fraction of the cost (one position instead of every position from
the subject on); the other positions are then not traced (NaN in the effects, left out of the
category averages and blank in the plots).

Batched: for one fact and one layer, every (token, noise sample) restoration is one batch, and the
pass resumes at the first restored layer from the cached corrupted activations (layers below it
are not run again). Tokens before the subject never see the noise, so their effect is 0 without
running anything.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmedit.core.hfcompat import only_blocks_after
from lmedit.core.tokens import fill
from lmedit.errors import RequestError
from lmedit.hooks import ReplaceInput, SetAtPositions, Trace
from lmedit.models.adapters import ModelAdapter, get_adapter
from lmedit.models.precision import model_device, working_copy

log = logging.getLogger(__name__)
KINDS = ("hidden", "mlp", "attn")
POSITIONS = ("all", "last_subject")
# ROME's figure rows: where a token sits relative to the subject
CATEGORIES = ("first subject token", "middle subject tokens", "last subject token", "first subsequent token",
              "further tokens", "last token")


@dataclass(frozen=True)
class Fact:
    prompt: str  # with "{}" where the subject goes
    subject: str
    answer: str | None = None  # the known answer; facts whose clean prediction is not its first token are skipped

    @property
    def text(self) -> str:
        return fill(self.prompt, self.subject)[0]


@dataclass
class FactTrace:
    """One fact's effects: per kind a (T, L) tensor of indirect effects (P restored - P corrupted);
    NaN at positions that were not traced."""

    fact: Fact
    tokens: list[str]
    subject_range: tuple[int, int]  # first and last subject token
    answer_token: str
    p_clean: float
    p_corrupted: float
    effects: dict[str, torch.Tensor]


@dataclass
class TraceResult:
    """Per-fact traces, their average by token category, and the suggested layers."""

    traces: list[FactTrace]
    n_layers: int
    skipped: list[dict[str, Any]] = field(default_factory=list)  # facts the model does not know, and why
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def by_category(self, kind: str) -> torch.Tensor:
        """(6, L) average indirect effect per token category (ROME's figure rows) and layer, over the
        facts that have traced tokens in that category (NaN where none has)."""
        sums = torch.zeros(len(CATEGORIES), self.n_layers, dtype=torch.float64)
        counts = torch.zeros(len(CATEGORIES), 1, dtype=torch.float64)
        for t in self.traces:
            for c, rows in enumerate(_categories(t.subject_range, len(t.tokens))):
                vals = t.effects[kind][rows].double()
                traced = torch.isfinite(vals).all(1)
                if traced.any():
                    sums[c] += vals[traced].mean(0)
                    counts[c] += 1
        return torch.where(counts > 0, sums / counts.clamp_min(1), torch.nan)

    def mlp_at_last_subject(self) -> list[float] | None:
        """Per layer, the average indirect effect of restoring the MLP outputs at the last subject token."""
        return self.by_category("mlp")[2].tolist() if "mlp" in self.settings.get("kinds", KINDS) else None

    def suggested_layers(self, n: int = 5) -> list[int]:
        """The ``n`` consecutive layers whose MLP effect at the last subject token sums highest
        (with the hidden-state effect when MLP outputs were not traced)."""
        effect = self.by_category("mlp" if "mlp" in self.settings.get("kinds", KINDS) else "hidden")[2].tolist()
        n = min(n, self.n_layers)
        best = max(range(self.n_layers - n + 1), key=lambda s: sum(effect[s:s + n]))
        return list(range(best, best + n))

    def summary(self) -> dict[str, Any]:
        return {
            "facts": len(self.traces), "skipped": len(self.skipped), "n_layers": self.n_layers,
            "settings": self.settings, "seconds": self.seconds,
            "mean_p_clean": sum(t.p_clean for t in self.traces) / max(len(self.traces), 1),
            "mean_p_corrupted": sum(t.p_corrupted for t in self.traces) / max(len(self.traces), 1),
            "mlp_effect_at_last_subject_token": self.mlp_at_last_subject(),
            "suggested_layers": self.suggested_layers(),
            "by_category": {k: [[v if v == v else None for v in row] for row in self.by_category(k).tolist()]
                            for k in self.settings.get("kinds", KINDS)},  # None: no traced token there
            "categories": list(CATEGORIES),
        }

    def save(self, out: str | Path) -> Path:
        """``trace.json`` (summary) and one heatmap PNG per kind in ``out``."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "trace.json").write_text(json.dumps(self.summary(), indent=1))
        for kind in self.settings.get("kinds", KINDS):
            self.plot(kind, out / f"trace_{kind}.png")
        return out

    def plot(self, kind: str, path: Path) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        import numpy as np

        data = np.ma.masked_invalid(self.by_category(kind).numpy())  # untraced rows stay blank
        cmap = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}[kind]
        fig, ax = plt.subplots(figsize=(max(4.0, 0.22 * self.n_layers + 2), 2.6))
        im = ax.pcolor(data, cmap=cmap, vmin=min(0.0, float(data.min())))
        ax.invert_yaxis()
        ax.set_yticks([i + 0.5 for i in range(len(CATEGORIES))])
        ax.set_yticklabels(CATEGORIES, fontsize=7)
        ax.set_xlabel("layer" + ("" if kind == "hidden" else f" (centre of a window of {self.settings.get('window')})"))
        what = {"hidden": "hidden state", "mlp": "MLP outputs", "attn": "attention outputs"}[kind]
        ax.set_title(f"average indirect effect of restoring the {what} ({len(self.traces)} facts)", fontsize=8)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def _categories(subject: tuple[int, int], T: int) -> list[list[int]]:
    s0, s1 = subject
    return [[s0], list(range(s0 + 1, s1)), [s1], [s1 + 1] if s1 + 1 < T - 1 else [],
            list(range(s1 + 2, T - 1)), [T - 1]]


def load_facts(path: str | Path, limit: int | None = None) -> list[Fact]:
    """Facts from ROME's known-facts file (``subject``, ``prompt`` or ``template``, ``attribute``) or
    any JSON list of {"prompt", "subject", "answer"}."""
    records = json.loads(Path(path).read_text())
    out = []
    for i, r in enumerate(records[:limit] if limit else records):
        subject = r.get("subject")
        prompt = r.get("template") or r.get("prompt")
        if not isinstance(subject, str) or not isinstance(prompt, str):
            raise RequestError(f"{path}: record {i} needs 'subject' and 'prompt' (or 'template')")
        if "{}" not in prompt:
            if subject not in prompt:
                raise RequestError(f"{path}: record {i}: subject {subject!r} not in prompt {prompt!r}")
            at = prompt.index(subject)
            prompt = prompt[:at] + "{}" + prompt[at + len(subject):]
        out.append(Fact(prompt, subject, r.get("attribute") or r.get("answer")))
    return out


class _Tracer:
    """Runs one fact's restorations on a model (in the compute dtype)."""

    def __init__(self, model: nn.Module, tokenizer, adapter: ModelAdapter, samples: int, window: int,
                 kinds: Sequence[str], generator: torch.Generator, positions: str = "all"):
        self.model, self.tok, self.adapter = model, tokenizer, adapter
        self.samples, self.window, self.kinds, self.gen = samples, window, kinds, generator
        self.positions = positions
        self.L = adapter.n_layers(model)
        self.decoder = adapter.decoder(model)
        self.head = adapter.unembed_module(model)
        self.embed = model.get_input_embeddings()
        self.device = model_device(model)

    def encode(self, fact: Fact) -> tuple[torch.Tensor, tuple[int, int]]:
        text = fact.text
        start = fact.prompt.index("{}")
        end = start + len(fact.subject)
        enc = self.tok(text, return_offsets_mapping=True)
        toks = [j for j, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < end and b > start]
        if not toks:
            raise RequestError(f"subject {fact.subject!r} not found among the tokens of {text!r}")
        return torch.tensor(enc["input_ids"], device=self.device), (toks[0], toks[-1])

    def _probs(self, hidden: torch.Tensor, answer: int) -> torch.Tensor:
        return torch.softmax(self.head(hidden[:, -1]).float(), -1)[:, answer]

    def _run(self, ids: torch.Tensor, start: int, h_in: torch.Tensor | None, embeds: torch.Tensor | None,
             sets: Sequence[SetAtPositions] = ()) -> torch.Tensor:
        """Last hidden states of a batch, resuming at block ``start`` from ``h_in`` (its input), or
        from the input embeddings ``embeds`` when ``start`` is 0."""
        from contextlib import ExitStack

        with ExitStack() as stack:
            for s in sets:
                stack.enter_context(s)
            if start == 0:
                return self.decoder(inputs_embeds=embeds, use_cache=False).last_hidden_state
            resume = self.adapter.final_norm_module(self.model) if start >= self.L else self.adapter.block(self.model, start)
            stack.enter_context(only_blocks_after(self.adapter, self.model, start - 1))
            stack.enter_context(ReplaceInput(resume, h_in))
            return self.decoder(input_ids=ids, use_cache=False).last_hidden_state

    def trace(self, fact: Fact, noise_std: float) -> FactTrace | str:
        ids, (s0, s1) = self.encode(fact)
        T, S, L = ids.shape[0], self.samples, self.L
        mods = {f"h{l}": self.adapter.block(self.model, l) for l in range(L)}
        if "mlp" in self.kinds:
            mods.update({f"m{l}": self.adapter.mlp_module(self.model, l) for l in range(L)})
        if "attn" in self.kinds:
            mods.update({f"a{l}": self.adapter.attn_module(self.model, l) for l in range(L)})
        clean_emb = self.embed(ids[None])
        with Trace(mods, capture="output") as clean:
            h = self.decoder(inputs_embeds=clean_emb, use_cache=False).last_hidden_state
        probs = torch.softmax(self.head(h[:, -1]).float(), -1)[0]
        answer = int(probs.argmax())
        answer_text = self.tok.decode([answer])
        if fact.answer is not None:
            want = self.tok(" " + fact.answer.strip(), add_special_tokens=False)["input_ids"][:1]
            if want != [answer]:
                return f"the model predicts {answer_text!r}, not the first token of {fact.answer!r}"
        noise = torch.randn(S, s1 - s0 + 1, clean_emb.shape[-1], generator=self.gen).to(clean_emb) * noise_std
        cor_emb = clean_emb.repeat(S, 1, 1)
        cor_emb[:, s0:s1 + 1] += noise
        with Trace({f"h{l}": self.adapter.block(self.model, l) for l in range(L)}, capture="output") as cor:
            hc = self.decoder(inputs_embeds=cor_emb, use_cache=False).last_hidden_state
        p_cor = float(self._probs(hc, answer).mean())
        first = s0 if self.positions == "all" else s1
        positions = torch.arange(first, T if self.positions == "all" else s1 + 1, device=self.device)
        P = len(positions)
        rows_pos = positions.repeat_interleave(S)  # (P*S,) the restored position of each row
        batch_ids = ids[None].expand(P * S, T)
        effects = {}
        for kind in self.kinds:
            eff = torch.zeros(T, L) if self.positions == "all" else torch.full((T, L), torch.nan)
            for layer in range(L):
                if kind == "hidden":
                    h_in = cor.outputs[f"h{layer}"].repeat(P, 1, 1)
                    h_in[torch.arange(P * S), rows_pos] = clean.outputs[f"h{layer}"][0, rows_pos]
                    out = self._run(batch_ids, layer + 1, h_in, None)
                else:
                    # ROME's window: centred on the layer, cut (not shifted) at the first and last layers
                    lo, hi = max(0, layer - self.window // 2), min(L, layer - (-self.window // 2))
                    prefix = kind[0]
                    sets = [SetAtPositions(self.adapter.mlp_module(self.model, l) if kind == "mlp" else
                                           self.adapter.attn_module(self.model, l),
                                           clean.outputs[f"{prefix}{l}"][0, rows_pos], rows_pos) for l in range(lo, hi)]
                    h_in = cor.outputs[f"h{lo - 1}"].repeat(P, 1, 1) if lo > 0 else None
                    out = self._run(batch_ids, lo, h_in, cor_emb.repeat(P, 1, 1) if lo == 0 else None, sets)
                p = self._probs(out, answer).view(P, S).mean(1)
                eff[positions.cpu(), layer] = (p - p_cor).float().cpu()
            effects[kind] = eff
        tokens = [self.tok.decode([t]) for t in ids.tolist()]
        return FactTrace(fact, tokens, (s0, s1), answer_text, float(probs[answer]), p_cor, effects)


def embedding_std(model: nn.Module, tokenizer, subjects: Sequence[str]) -> float:
    """Standard deviation of the token embeddings of ``subjects`` (ROME's noise scale unit)."""
    ids = [t for s in subjects for t in tokenizer(s, add_special_tokens=False)["input_ids"]]
    with torch.no_grad():
        return float(model.get_input_embeddings()(torch.tensor(ids, device=model_device(model))).float().std())


@torch.no_grad()
def trace(model: nn.Module, tokenizer, facts: Sequence[Fact], *, samples: int = 10, noise: float = 3.0,
          window: int = 10, kinds: Sequence[str] = KINDS, positions: str = "all", compute_dtype: str = "auto",
          seed: int = 1, limit: int | None = None, progress: bool = False) -> TraceResult:
    """Causal tracing of ``facts`` (see the module docstring); facts the model does not know are
    skipped, and ``limit`` stops after that many facts were traced."""
    from tqdm.auto import tqdm

    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"kinds must be among {KINDS}, got {list(kinds)}")
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    if samples < 1 or window < 1 or noise <= 0:
        raise ValueError(f"need samples >= 1, window >= 1 and noise > 0, got {samples}, {window}, {noise}")
    adapter = get_adapter(model)
    t0 = time.perf_counter()
    std = embedding_std(model, tokenizer, [f.subject for f in facts])
    gen = torch.Generator().manual_seed(seed)
    traces, skipped = [], []
    with working_copy(model, compute_dtype) as work:
        tracer = _Tracer(work, tokenizer, adapter, samples, min(window, adapter.n_layers(model)), kinds, gen, positions)
        bar = tqdm(total=limit or len(facts), desc="causal tracing", unit="fact", disable=not progress)
        for fact in facts:
            if limit is not None and len(traces) >= limit:
                break
            got = tracer.trace(fact, noise * std)
            bar.update(0 if isinstance(got, str) else 1)
            if isinstance(got, str):
                skipped.append({"prompt": fact.text, "why": got})
            else:
                traces.append(got)
        bar.close()
    settings = {"samples": samples, "noise": noise, "noise_std": noise * std, "window": window, "kinds": list(kinds),
                "positions": positions,
                "compute_dtype": compute_dtype, "seed": seed}
    return TraceResult(traces, adapter.n_layers(model), skipped, settings, time.perf_counter() - t0)
