"""Phase-by-phase cost of editing (run by hand, not part of the tests).

Usage: ``python benchmarks/run.py [--model DIR] [--batch-sizes 1,16,64,256] [--stats-samples 2000]
        [--dtype-targets bfloat16] [--out benchmarks/results/embedded.json]``

Measures on the embedded model (or any model): statistics (tokens/s, and a plain forward pass
through the same layers as its floor), target vectors (s per request at several batch sizes, and
the per-step cost against a reference-style step: full model, every position, full logits),
key collection, the solve per layer, evaluation (prompts/s), and peak memory (RSS; CUDA max
allocated on a GPU). Prints a table and writes JSON with software versions and thread count.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch

import lmedit
from lmedit._runtime import configure_threads
from lmedit.core.context import context_templates
from lmedit.core.corpus import load_corpus
from lmedit.core.keys import STATE_BYTES, PromptStates, collect_keys, key_prompts
from lmedit.core.solvers import emmet, memit
from lmedit.core.stats import second_moments
from lmedit.core.targets import TargetConfig, compute_targets
from lmedit.core.tokens import pad, pad_id, token_chunks
from lmedit.evaluate.runner import record_scores
from lmedit.hooks import Trace
from lmedit.models.precision import model_device, working_copy

from eval_dtype import old_scoring  # noqa: E402  (benchmarks/ is on sys.path when this script runs)
from one_at_a_time import reference_step_s  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "counterfact" / "counterfact_500.json"


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def bench_statistics(model, tok, adapter, args, layers, rows) -> dict:
    """One statistics pass for all layers vs a plain forward through the same layers (its floor)."""
    import tempfile

    texts = load_corpus("wikipedia-excerpt", args.stats_samples)
    enc = tok(texts, truncation=True, max_length=1024)["input_ids"]
    n_tok = sum(len(x) for x in enc)
    with tempfile.TemporaryDirectory() as d:
        _, t_stats = timed(lambda: second_moments(model, tok, adapter, layers, n_samples=args.stats_samples,
                                                  forward_dtype=args.stats_dtype, cache_dir=d, progress=False))

    def plain_forward(work):
        with torch.no_grad():
            for g in token_chunks([len(x) for x in enc], 8192):
                ids, mask = pad([enc[i] for i in g], pad_id(tok))
                with Trace({"stop": adapter.block(work, layers[-1])}, stop=True):
                    work(input_ids=ids.to(model_device(work)), attention_mask=mask.to(model_device(work)), use_cache=False)

    with working_copy(model, args.stats_dtype) as work:
        _, t_floor = timed(lambda: plain_forward(work))
    rows.append(("statistics", f"{t_stats:.1f} s ({n_tok / t_stats:,.0f} tok/s, {n_tok:,} tokens, L{layers[0]}-{layers[-1]})",
                 f"plain forward to L{layers[-1]}: {t_floor:.1f} s"))
    return {"tokens": n_tok, "seconds": t_stats, "tokens_per_s": n_tok / t_stats, "floor_forward_s": t_floor,
            "layers": layers, "forward_dtype": args.stats_dtype}


def bench_targets(model, tok, adapter, args, layers, requests, flat, rows) -> dict:
    """Target vectors per batch size, and a reference-style step (full model, all positions, full logits)."""
    config = TargetConfig(v_num_grad_steps=args.steps, compute_dtype=args.dtype_targets, clamp_norm_factor=4.0,
                          v_weight_decay=1e-3)
    out: dict = {}
    with working_copy(model, args.dtype_targets) as work:
        for bs in [int(x) for x in args.batch_sizes.split(",")]:
            batch = requests[:bs]
            tr, t = timed(lambda: compute_targets(work, tok, adapter, batch, flat, layers[-1], config))
            steps = float(tr.steps.float().mean())
            out[bs] = {"seconds": t, "s_per_request": t / bs, "mean_steps": steps,
                       "forward_tokens": tr.stats["forward_tokens"]}
            rows.append((f"targets, batch {bs}", f"{t / bs:.2f} s/request ({t:.1f} s)", f"mean steps {steps:.1f}"))
    r0 = requests[0]
    texts0 = [t.replace("{}", r0.prompt, 1).replace("{}", r0.subject) for t in flat] + [f"{r0.subject} is a"]
    t_ref = reference_step_s(model, tok, texts0, reps=1)
    out["reference_style_step_s_per_request"] = t_ref
    rows.append(("targets floor ref.", f"reference-style step: {t_ref * 1000:.0f} ms/request",
                 f"x{args.steps} steps = {t_ref * args.steps:.1f} s/request (before early stop)"))
    return out


def spread_keys(model, tok, adapter, batch, groups, layers, kept: bool) -> float:
    """Seconds to read the keys layer by layer as the spread distribution does (a write counted after
    each layer), with the hidden states below kept between passes (PromptStates) or each pass from
    the embeddings (as lmedit did before)."""
    states = PromptStates(model, tok, adapter, *key_prompts(batch, groups), floor=layers[0],
                          state_bytes=STATE_BYTES if kept else 0)
    versions: dict[int, int] = {}
    t = time.perf_counter()
    for layer in layers:
        collect_keys(model, tok, adapter, batch, groups, [layer], states=states, versions=versions)
        versions[layer] = versions.get(layer, 0) + 1
    return time.perf_counter() - t


def bench_keys_and_solves(model, tok, adapter, layers, requests, groups, rows) -> dict:
    batch = requests[:64]
    _, t_keys = timed(lambda: collect_keys(model, tok, adapter, batch, groups, layers))
    out: dict = {"keys_s_per_request": t_keys / len(batch)}
    rows.append((f"keys ({len(layers)} layers)", f"{t_keys / len(batch) * 1000:.0f} ms/request", "batch 64, one pass"))
    t_full, t_kept = (spread_keys(model, tok, adapter, batch, groups, layers, kept) for kept in (False, True))
    out["spread_keys"] = {"from_embeddings_s": t_full, "kept_states_s": t_kept, "speedup": t_full / t_kept}
    rows.append(("keys, spread", f"{t_kept:.1f} s with kept states, {t_full:.1f} s from the embeddings",
                 f"x{t_full / t_kept:.2f}, batch 64, L{layers[0]}-{layers[-1]} one by one"))
    d_out, d_in = adapter.weight(model, layers[0]).shape
    X = torch.randn(4 * d_in, d_in, dtype=torch.float64)
    C = X.T @ X / X.shape[0]
    for B in (16, 256):
        K = torch.randn(d_in, B, dtype=torch.float64)
        R = torch.randn(d_out, B, dtype=torch.float64)
        _, t_e = timed(lambda: emmet(R, K, C, 1.0, 0.1))
        _, t_m = timed(lambda: memit(R, K, C, 1500.0))
        out[f"solve_b{B}"] = {"emmet_s": t_e, "memit_s": t_m}
        rows.append((f"solve per layer, B={B}", f"EMMET {t_e * 1000:.0f} ms, MEMIT {t_m * 1000:.0f} ms", "float64, Cholesky"))
    return out


def bench_evaluation(model, tok, requests, rows) -> dict:
    ev = requests[:64]
    n_prompts = sum(2 * (1 + len(r.paraphrase_prompts) + len(r.neighborhood_prompts)) for r in ev)
    _, t_ev = timed(lambda: record_scores(model, tok, ev))
    t_old = old_scoring(model, tok, ev)
    rows.append(("evaluation", f"{n_prompts / t_ev:.0f} prompts/s", f"{len(ev)} CounterFact records, model dtype; "
                 f"scoring before prefix sharing: {n_prompts / t_old:.0f} prompts/s (x{t_old / t_ev:.2f})"))
    return {"prompts": n_prompts, "seconds": t_ev, "prompts_per_s": n_prompts / t_ev,
            "old_scoring_prompts_per_s": n_prompts / t_old}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--layers", default="4,5,6,7,8")
    ap.add_argument("--batch-sizes", default="1,16,64,256")
    ap.add_argument("--stats-samples", type=int, default=2000)
    ap.add_argument("--stats-dtype", default="bfloat16", help="forward dtype of the statistics pass")
    ap.add_argument("--dtype-targets", default="bfloat16", help="compute dtype of the target optimisation")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--out", default="benchmarks/results/embedded.json")
    args = ap.parse_args()
    threads = configure_threads()
    layers = [int(x) for x in args.layers.split(",")]
    model, tok = lmedit.load_model(args.model)
    adapter = lmedit.get_adapter(model)
    rows: list[tuple[str, str, str]] = []
    res: dict = {"versions": {"lmedit": lmedit.__version__, "torch": torch.__version__,
                              "transformers": __import__("transformers").__version__, "python": platform.python_version()},
                 "threads": threads, "device": str(model_device(model)), "cpu": platform.processor() or platform.machine()}
    requests = lmedit.load_requests(args.data)
    groups = context_templates(model, tok)
    res["statistics"] = bench_statistics(model, tok, adapter, args, layers, rows)
    res["targets"] = bench_targets(model, tok, adapter, args, layers, requests, [t for g in groups for t in g], rows)
    res.update(bench_keys_and_solves(model, tok, adapter, layers, requests, groups, rows))
    res["evaluation"] = bench_evaluation(model, tok, requests, rows)
    res["peak_rss_mb"] = rss_mb()
    if torch.cuda.is_available():
        res["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    rows.append(("peak memory", f"RSS {rss_mb():.0f} MB", ""))
    w = max(len(r[0]) for r in rows)
    print(f"lmedit {lmedit.__version__}, torch {torch.__version__}, {threads} threads, {model_device(model)}")
    for a, b, c in rows:
        print(f"{a:<{w}}  {b:<48} {c}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
