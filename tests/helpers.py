"""Helpers shared by the test modules (``from helpers import ...``; ``tests/conftest.py`` puts this
folder on ``sys.path``). Fixtures stay in ``conftest.py``; plain functions and constants live here,
so that no test module imports another.

Example::

    from helpers import ARCHS, assert_same, snapshot, target_logprob

    before = snapshot(model)
    lp0 = target_logprob(model, tok, request)   # log P(target_new | prompt), one plain forward
    ...
    assert_same(model, before)                  # every parameter bit-exactly as it was
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch

import lmedit

# --- the tiny architectures and the shared benchmark data ----------------------------------------

# Every model family with a tiny test model; the order also seeds build_tiny (llama != mistral).
ARCHS = ("gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma3_text", "olmo", "phi3")

# The benchmark data sits beside the repository: <repo>/../shared/data (this file is <repo>/tests/).
DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
COUNTERFACT_500 = DATA_DIR / "counterfact" / "counterfact_500.json"
COUNTERFACT_TRAIN = DATA_DIR / "counterfact" / "counterfact_train_10000.json"
ZSRE_EVAL = DATA_DIR / "zsre" / "zsre_eval_1037.json"
MQUAKE_HARD = DATA_DIR / "mquake" / "mquake_hard_429.json"

# Every test that reads DATA_DIR carries this mark: without the data it is skipped, not failed.
needs_data = pytest.mark.skipif(
    not DATA_DIR.is_dir(),
    reason=f"../shared/data not found: {DATA_DIR} (the benchmark data beside the repository)",
)


# --- model state ---------------------------------------------------------------------------------

def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every entry of the state dict."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    """Names of the state-dict entries that are not bit-exactly as in ``before``."""
    sd = model.state_dict()
    assert set(sd) == set(before), f"state-dict keys differ: {sorted(set(sd) ^ set(before))}"
    return {k for k, v in sd.items() if not torch.equal(v, before[k])}


def assert_same(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    """Every parameter and buffer is bit-exactly as in ``before``."""
    diff = changed(model, before)
    assert not diff, f"parameters changed: {sorted(diff)}"


class Pristine:
    """Tiny models built once per (arch, seed, dtype); each call hands out a deep copy to edit.

    ``fresh = Pristine(make_tiny); model = fresh("llama", seed=1)`` (conftest's ``fresh`` fixture
    holds one per test module, so the built models are released with the module).
    """

    def __init__(self, make_tiny: Callable[..., torch.nn.Module]):
        self.make_tiny = make_tiny
        self.built: dict[tuple[str, int, torch.dtype], torch.nn.Module] = {}

    def __call__(self, arch: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        key = (arch, seed, dtype)
        if key not in self.built:
            self.built[key] = self.make_tiny(arch, seed=seed, dtype=dtype)
        return copy.deepcopy(self.built[key])


# --- random SPD covariances (so no test needs a corpus) ------------------------------------------

def random_spd(d: int, seed: int = 0, n: int | None = None, eps: float = 1e-3,
               dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """C = X^T X / n + eps I with X (n, d) Gaussian: symmetric positive definite, (d, d)."""
    g = torch.Generator().manual_seed(seed)
    n = n or 4 * d
    X = torch.randn(n, d, generator=g, dtype=dtype)
    return X.T @ X / n + eps * torch.eye(d, dtype=dtype)


def spd_covariances(model: torch.nn.Module, layers: Sequence[int], seed: int = 0) -> dict[int, torch.Tensor]:
    """{layer: C (d_in, d_in)} random SPD matrices sized for the model's edited projections."""
    adapter = lmedit.get_adapter(model)
    return {l: random_spd(adapter.weight(model, l).shape[1], seed=seed + l) for l in layers}


# --- teacher-forced scoring by hand --------------------------------------------------------------

def continuation_tokens(tok, prefix: str, continuation: str) -> list[int]:
    """The tokens of ``continuation`` after ``prefix``: tok(prefix + " " + continuation) minus
    tok(prefix), checked to extend tok(prefix) (true for the prompts used in the tests)."""
    p = tok(prefix)["input_ids"]
    full = tok(prefix + " " + continuation)["input_ids"]
    assert full[: len(p)] == p and len(full) > len(p), (prefix, continuation)
    return full[len(p):]


def teacher_forced_logprobs(model, tok, prefix: str | Sequence[int], continuation: str | Sequence[int], *,
                            with_argmax: bool = False):
    """log P(c_t | prefix, c_<t) for each continuation token c_t, float64 (n,), from ONE plain,
    unpadded forward pass of ``prefix + continuation``; no lmedit code involved.

    ``prefix`` is text or token ids; ``continuation`` is text (tokenised by
    :func:`continuation_tokens`, so a text prefix is required) or token ids. Any hook on the model
    (e.g. ``AddAtPositions``) acts on the pass. ``with_argmax=True`` returns ``(logprobs, is_argmax)``,
    ``is_argmax[t]`` telling whether c_t is the model's argmax at its position.
    """
    p = tok(prefix)["input_ids"] if isinstance(prefix, str) else list(prefix)
    c = continuation_tokens(tok, prefix, continuation) if isinstance(continuation, str) else list(continuation)
    with torch.no_grad():
        logits = model(torch.tensor([p + c])).logits[0]  # (T, V)
    rows = torch.arange(len(p) - 1, len(p) + len(c) - 1)  # position t predicts token t + 1
    target = torch.tensor(c)
    lp = torch.log_softmax(logits[rows].double(), -1)[torch.arange(len(c)), target]  # (n,)
    if with_argmax:
        return lp, logits[rows].argmax(-1) == target
    return lp


def target_logprob(model, tok, req: lmedit.EditRequest) -> float:
    """log P(target_new tokens | prompt), summed over the target's tokens."""
    return float(teacher_forced_logprobs(model, tok, req.text, req.target_new).sum())


def rose(before: float, after: float) -> bool:
    """A substantial rise of log P(target): 100x, or to above 0.5 (when it started above 0.005)."""
    return after > before + 1.0 and (after > before + math.log(100) or after > math.log(0.5))


# --- the requests and settings of the method battery ---------------------------------------------

METHODS = ("rome", "memit", "emmet")

# Prompts end with the subject, so the target token is predicted where the edit acts (see the
# battery's docstring).
REQUESTS = [
    lmedit.EditRequest("The capital city of the country is {}", "Xanadu", "Paris", "Rome"),
    lmedit.EditRequest("The sport played best by {}", "Lionel Messi", "piano", "football"),
]
OTHER = [lmedit.EditRequest("The most famous painter is {}", "Leonardo", "Berlin", "Vinci")]


def layers_for(method: str) -> list[int]:
    return [2] if method == "rome" else [1, 2]


def edit_kwargs(method: str) -> dict:
    """A strong edit for a random model: 12 Adam steps, ||delta|| up to 4 ||init||, small lambda for MEMIT."""
    # chat_prompts off: the tokenizer has a chat template, but a random model is no instruct model
    # (tests/integration/test_chat.py covers the chat form)
    kw = dict(layers=layers_for(method), v_num_grad_steps=12, v_lr=0.5, clamp_norm_factor=4.0,
              context_templates=[[5, 2]], chat_prompts="off")
    if method == "memit":
        kw["mom2_update_weight"] = 1.0  # MEMIT's GPT-J lambda (15000) barely moves a random model
    return kw


# Subjects at the start, in the middle and in a long prompt; targets of one and several tokens: for
# adapters, positions and the target fast path (whose checks do not need the edit to show).
VARIED_REQUESTS = [
    lmedit.EditRequest("The capital of {} is", "Xanadu", "Paris", "Rome"),
    lmedit.EditRequest("{} plays the", "Lionel Messi", "piano keyboard"),
    lmedit.EditRequest("As everyone who has been there knows, the food of {}", "Italy", "is terrible"),
]


def edited_names(model, method: str) -> set[str]:
    """State-dict names of the projections ``method`` edits with :func:`layers_for`."""
    adapter = lmedit.get_adapter(model)
    return {adapter.edit_param_name(l) for l in layers_for(method)}
