"""Command line: ``lmedit demo | edit | eval | sweep | trace | list | ledger show|lora|undo|export|compact``; a thin layer over the library.

Example: ``lmedit edit --requests edits.json --method emmet --layers 4,5,6,7,8 --json``
(``lmedit edit --list-hparams`` lists every method's hyperparameters with their defaults and help)

Errors are printed as one line ``lmedit: error: ...`` with exit code 2, never a traceback
(``LMEDIT_DEBUG=1`` shows it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

EXIT_ERROR = 2


class _UsageError(ValueError):
    """A command-line usage error (unknown option, bad --layers ...), reported as one line by main()."""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors raise instead of printing usage and exiting, so main() can report them
    as its one ``lmedit: error: ...`` line and return the exit code (subparsers inherit the class)."""

    def error(self, message: str):  # type: ignore[override]
        raise _UsageError(f"{message} (see `{self.prog} --help`)")


def _parse_layers(text: str) -> list[int]:
    try:
        if "-" in text and "," not in text:
            a, b = text.split("-")
            return list(range(int(a), int(b) + 1))
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers must look like 4,5,6 or 4-8, got {text!r}") from None


def parse_value(text: str) -> Any:
    """A ``--set key=value`` value: JSON where it parses (numbers, lists, booleans), else a string."""
    try:
        return json.loads(text)
    except ValueError:
        if "," in text:
            return [parse_value(x) for x in text.split(",")]
        return text


def _parse_sets(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = parse_value(v.strip())
    return out


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="local HF directory or hub id (default: the embedded SmolLM2-135M)")
    p.add_argument("--dtype", default=None, help="model dtype: float32 (default), bfloat16, float16")
    p.add_argument("--device-map", default=None, help="passed to from_pretrained, e.g. auto or cuda")
    p.add_argument("--method", default=None, help="a registered method: rome, memit, emmet, encore, alphaedit "
                   "(default emmet; with an existing --ledger, the ledger's)")
    p.add_argument("--layers", type=_parse_layers, default=None, help="edited layers, e.g. 4,5,6,7,8 or 4-8")
    p.add_argument("--distribution", default=None, help="how the residual is shared among the layers: single, "
                   "spread (default), joint, cascade, refit (see `lmedit list`)")
    p.add_argument("--preset", default=None, help="hyperparameter preset (default: matched from the architecture)")
    p.add_argument("--easyedit-hparams", default=None, metavar="YAML", help="an EasyEdit hyperparameter file "
                   "(ROME, MEMIT, EMMET, AlphaEdit); its alg_name gives the method (see docs/easyedit.md)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a hyperparameter, e.g. --set mom2_update_weight=1500 (repeatable)")
    p.add_argument("--stats-dir", default=None, metavar="DIR", help="where statistics are cached and looked for "
                   "(default: lmedit's cache; `lmedit stats --out DIR` writes one)")
    p.add_argument("--memory-budget", default=None, metavar="SIZE", help="memory the target optimisation may take, "
                   "e.g. 8GB (default: LMEDIT_MEMORY_BUDGET, else what is available): chunks are made smaller to "
                   "fit, a request that cannot fit alone is refused before any work")
    p.add_argument("--drop-conflicts", action="store_true", help="leave out a request that asks an earlier one's "
                   "subject and prompt for another target (the first asked wins; one batch cannot hold both), "
                   "then take --n")
    p.add_argument("--quiet", action="store_true", help="no progress bars or info messages")


def _requests(args, path: str) -> list:
    """The requests of ``path`` (--format, --n, --drop-conflicts before --n)."""
    import lmedit

    return lmedit.load_requests(path, format=args.format, limit=args.n, drop_conflicts=args.drop_conflicts)


def _lora_args(p: argparse.ArgumentParser, flag: str, help_text: str, required: bool = False) -> None:
    p.add_argument(flag, dest="lora_dir", default=None, required=required, metavar="DIR", help=help_text)
    p.add_argument("--lora-rank", type=int, default=None, help="cap the adapter's rank per layer (truncated SVD; "
                   "default: the update's own rank, exact)")
    p.add_argument("--lora-max-error", type=float, default=None, metavar="E",
                   help="smallest rank per layer whose relative Frobenius error is at most E, e.g. 0.01")


def _ledger_parser(sub) -> None:
    p = sub.add_parser("ledger", help="inspect an edit ledger, drop its last batches, compact it, or export it "
                       "(LoRA, model)")
    lsub = p.add_subparsers(dest="ledger_command", required=True)
    q = lsub.add_parser("show", help="batches, request count, methods, per-layer norm growth")
    q.add_argument("path")
    q.add_argument("--model", default=None, help="the base model, for relative norm growth (default: embedded)")
    q.add_argument("--json", action="store_true")
    q = lsub.add_parser("lora", help="export the sum of every batch as a peft LoRA adapter directory")
    q.add_argument("path")
    q.add_argument("--model", default=None, help="the ledger's base model (default: embedded)")
    _lora_args(q, "--out", "the adapter directory to write", required=True)
    q.add_argument("--json", action="store_true")
    q = lsub.add_parser("undo", help="drop the last batches (the base model plus the ledger is then the model as it "
                        "was before them)")
    q.add_argument("path")
    q.add_argument("--batches", type=int, default=1, help="how many of the last batches to drop (default 1)")
    q.add_argument("--json", action="store_true")
    q = lsub.add_parser("export", help="write the edited model (base model plus every batch) as a Hugging Face "
                        "model directory (safetensors, with the tokenizer)")
    q.add_argument("path")
    q.add_argument("--model", default=None, help="the ledger's base model (default: embedded)")
    q.add_argument("--out", required=True, help="the model directory to write (must not exist, or be empty)")
    q.add_argument("--json", action="store_true")
    q = lsub.add_parser("compact", help="fold the batches into one exact total (the same edited model; of each "
                        "batch only its keys stay; one replay step; folded batches can no longer be dropped)")
    q.add_argument("path")
    q.add_argument("--model", default=None, help="the ledger's base model (default: embedded)")
    q.add_argument("--keep-last", type=int, default=0, metavar="N",
                   help="leave the last N batches as they are, so they can still be dropped (default 0)")
    q.add_argument("--json", action="store_true")


def _trace_parser(sub) -> None:
    p = sub.add_parser("trace", help="causal tracing: where the model recalls facts, and which layers to edit")
    p.add_argument("--model", default=None, help="a named model, a .gguf file, a local HF directory (default: embedded)")
    p.add_argument("--dtype", default=None, help="model dtype: float32 (default), bfloat16 (half the memory of a "
                   "float32 model beside the traces' bfloat16 copy)")
    p.add_argument("--data", required=True, help="facts: ROME's known_1209.json or a JSON list of {prompt, subject, answer}")
    p.add_argument("--n", type=int, default=None, help="trace the first N facts the model knows (others are skipped)")
    p.add_argument("--samples", type=int, default=10, help="noise samples per fact (ROME: 10)")
    p.add_argument("--noise", type=float, default=3.0, help="noise std in units of the subjects' embedding std (ROME: 3)")
    p.add_argument("--window", type=int, default=10, help="layers restored together for MLP / attention (ROME: 10)")
    p.add_argument("--kinds", default="hidden,mlp,attn", help="what to restore: hidden, mlp, attn")
    p.add_argument("--positions", default="all", choices=("all", "last_subject"),
                   help="restore at every token from the subject on (ROME's figure), or at the last subject token "
                        "only (the row the suggested layers read; several times faster)")
    p.add_argument("--dtype-compute", default="auto", help="dtype of the passes: auto (bfloat16 where native), model, "
                   "float32, bfloat16")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default=None, help="write trace.json and heatmap PNGs here")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true")


def _stats_parser(sub) -> None:
    p = sub.add_parser("stats", help="compute and cache the statistics C = E[k k^T] of edited layers "
                       "(data parallel under torchrun; --shard/--merge for schedulers)")
    p.add_argument("--model", default=None, help="local HF directory, named offline model or .gguf (default: embedded)")
    p.add_argument("--dtype", default=None, help="model dtype: float32 (default), bfloat16, float16")
    p.add_argument("--device-map", default=None, help="passed to from_pretrained, e.g. auto")
    p.add_argument("--method", default="emmet", help="whose preset gives the defaults below (default emmet)")
    p.add_argument("--preset", default=None, help="hyperparameter preset (default: matched from the architecture)")
    p.add_argument("--layers", type=_parse_layers, default=None, help="layers, e.g. 4-8 (default: the preset's)")
    p.add_argument("--n-samples", type=int, default=None, help="texts of the corpus (default: the preset's)")
    p.add_argument("--corpus", default=None, help="wikipedia-excerpt, wikipedia or a .txt/.jsonl file (default: the preset's)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per text (default: the preset's)")
    p.add_argument("--accumulate", default=None, choices=["float64", "float32"], help="accumulation dtype (default: the preset's)")
    p.add_argument("--forward-dtype", default=None, help="dtype of the forward pass: model, auto, float32, bfloat16 "
                   "(default: the preset's)")
    p.add_argument("--max-tokens", type=int, default=8192, help="padded tokens per forward pass (part of the plan "
                   "that shards share)")
    p.add_argument("--out", default=None, metavar="DIR", help="statistics directory to write (default: lmedit's "
                   "cache); give it to edit/eval with --stats-dir; with --shard, the directory of partial sums")
    p.add_argument("--shard", default=None, metavar="I/N", help="compute only shard I of N (0-based) and write "
                   "checksummed partial sums to --out")
    p.add_argument("--merge", nargs="+", default=None, metavar="DIR", help="combine the partial sums in these "
                   "directories (all N shards, one plan) into statistics in --out; loads no model")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lmedit", description="Edit facts in Hugging Face causal LMs (ROME, MEMIT, EMMET).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("edit", help="apply edits from a request file and show before/after")
    _common(p)
    p.add_argument("--requests", default=None, help="request file (CounterFact, EasyEdit, zsRE or plain JSON/JSONL)")
    p.add_argument("--list-hparams", action="store_true", help="list every method's hyperparameters and exit")
    p.add_argument("--format", default=None, help="request file format (default: detected)")
    p.add_argument("--n", type=int, default=None, help="use the first N requests")
    p.add_argument("--save-deltas", default=None, help="write the weight updates to this .safetensors file")
    p.add_argument("--save-model", default=None, help="save the edited model to this directory (a new or empty one)")
    p.add_argument("--ledger", default=None, help="edit ledger directory: created, or replayed onto the base model "
                   "and appended to (the base model plus DIR is the edited model)")
    _lora_args(p, "--save-lora", "write the edit as a peft LoRA adapter directory (with --ledger: every batch of it)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")

    _ledger_parser(sub)
    _trace_parser(sub)
    _stats_parser(sub)

    p = sub.add_parser("list", help="methods, distributions and models, one line each")
    p.add_argument("--json", action="store_true", help='{"methods": [...], "distributions": [...], "models": [...]}')

    p = sub.add_parser("demo", help="edit the embedded model with a small example file (the README's main job)")
    p.add_argument("--method", default="emmet")
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("eval", help="edit records in batches and report CounterFact / zsRE metrics")
    _common(p)
    p.add_argument("--data", required=True, help="data file")
    p.add_argument("--format", default=None, help="counterfact, easyedit, zsre or plain (default: detected)")
    p.add_argument("--n", "--limit", dest="n", type=int, default=None, help="number of records (--limit under "
                   "torchrun, whose own options make --n ambiguous)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--sequential", action="store_true", help="let batches accumulate (sequential batched editing)")
    p.add_argument("--generation", action="store_true", help="also measure generation entropy (fluency)")
    p.add_argument("--chat", action="store_true", help="also score every prompt as the user turn of the tokenizer's "
                   "chat template, the answer in the assistant turn (metrics named chat_...)")
    p.add_argument("--easyedit", action="store_true", help="also report EasyEdit's rewrite_acc, rephrase_acc and "
                   "locality (token accuracy; see docs/easyedit.md)")
    p.add_argument("--out", default=None, help="write the JSON result here")
    p.add_argument("--json", action="store_true")
    _eval_dtype(p)

    p = sub.add_parser("sweep", help="grid of methods x batch sizes with tables and plots")
    _common(p)
    p.add_argument("--methods", default="memit,emmet")
    p.add_argument("--batch-sizes", default="1,16,64,256")
    p.add_argument("--data", required=True)
    p.add_argument("--format", default=None)
    p.add_argument("--n", "--limit", dest="n", type=int, default=None, help="number of records (--limit under torchrun)")
    p.add_argument("--out", default="sweep")
    p.add_argument("--set-method", action="append", default=[], metavar="METHOD:KEY=VALUE",
                   help="override a hyperparameter for one method only, e.g. memit:mom2_update_weight=1500")
    _eval_dtype(p)
    return parser


def _eval_dtype(p) -> None:
    p.add_argument("--eval-dtype", default="model", choices=("model", "auto", "float32", "bfloat16", "float16"),
                   help="dtype of the evaluation's forward passes (default: the model's); bfloat16 (or auto: bfloat16 "
                   "where native) is about 2x faster on CPUs with AVX512-BF16 but moves PS/NS by up to 1.6 points "
                   "(results/eval_dtype)")


def _load(args):
    import lmedit

    from lmedit.distributed import local_device

    device_map = args.device_map
    if device_map is None and local_device() is not None:  # under torchrun with GPUs: one GPU per process
        device_map = {"": str(local_device())}
    model, tok = lmedit.load_model(args.model, dtype=args.dtype, device_map=device_map)
    return model, tok


def _overrides(args) -> dict[str, Any]:
    ov = _parse_sets(args.sets)
    if args.layers is not None:
        ov["layers"] = args.layers
    if args.distribution is not None:
        ov["distribution"] = args.distribution
    return ov


def _probe(model, tok, requests) -> list[dict[str, Any]]:
    """P(target_new), P(target_true) (whole-sequence probabilities) and a greedy continuation per request."""
    from lmedit.evaluate.scoring import generate_texts, score_continuations

    prefixes = [r.text for r in requests for _ in (0, 1)]
    conts = [t for r in requests for t in (r.target_new, r.target_true or r.target_new)]
    scored = score_continuations(model, tok, prefixes, conts)
    gens = generate_texts(model, tok, [r.text for r in requests], max_new_tokens=8)
    out = []
    for i, r in enumerate(requests):
        p_new = math.exp(float(scored[2 * i][0].sum()))
        p_true = math.exp(float(scored[2 * i + 1][0].sum())) if r.target_true else None
        out.append({"p_new": p_new, "p_true": p_true, "continuation": gens[i]})
    return out


def _hparams(args):
    """The hyperparameters of --easyedit-hparams (with the method it names), or None."""
    if not getattr(args, "easyedit_hparams", None):
        return None
    from lmedit.easyedit import load_hparams

    hp = load_hparams(args.easyedit_hparams)
    if args.method is not None:
        raise ValueError("--method and --easyedit-hparams both name the method; give one of them")
    return hp


def _editor(model, tok, method: str, preset: str | None, overrides: dict[str, Any], progress: bool,
            ledger: str | None = None, hparams=None, stats_dir: str | None = None):
    """A new Editor, or (with ``ledger`` naming an existing ledger) one with the ledger replayed."""
    import lmedit

    if ledger and (Path(ledger) / "manifest.json").exists():
        if hparams is not None:
            raise ValueError("--easyedit-hparams applies to a new ledger only (an existing one carries its own settings)")
        return lmedit.Editor.load(model, tok, ledger, method, progress=progress, stats_dir=stats_dir, **overrides)
    return lmedit.Editor(model, tok, method, hparams=hparams, preset=preset, progress=progress, ledger=ledger,
                         keep_history=ledger is None, stats_dir=stats_dir, **overrides)


def _edit_report(model, tok, requests, method: str, preset: str | None, overrides: dict[str, Any], progress: bool,
                 ledger: str | None = None, hparams=None, stats_dir: str | None = None):
    editor = _editor(model, tok, method, preset, overrides, progress, ledger, hparams, stats_dir)
    pre = _probe(model, tok, requests)
    result = editor.edit(requests)
    post = _probe(model, tok, requests)
    report = {
        "method": result.method, "layers": result.layers,
        "requests": [
            {"subject": r.subject, "prompt": r.text, "target_new": r.target_new, "target_true": r.target_true,
             "pre": pre[i], "post": post[i]} for i, r in enumerate(requests)
        ],
        "timings": {k: round(result.timings.get(k, 0.0), 3)
                    for k in ("stats_s", "targets_s", "keys_s", "residual_s", "solve_s", "total_s")},
        "hparams": result.hparams_record(),
    }
    carried = {(r.prompt, r.subject) for r in result.carried}
    replaced = [f for _, f in result.superseded if (f.prompt, f.subject) not in carried]
    if replaced:  # earlier edits of the same facts, replaced by this one (supersede_edits)
        report["superseded"] = [{"subject": f.subject, "prompt": f.prompt.format(f.subject)} for f in replaced]
    if result.carried:  # earlier facts of the same keys, edited again with this batch (share_key_targets)
        report["carried"] = [{"subject": r.subject, "prompt": r.text, "target_new": r.target_new} for r in result.carried]
    return result, report


def _print_table(report: dict[str, Any]) -> None:
    def pct(x):
        return "-" if x is None else f"{100 * x:6.2f}%"

    print(f"method {report['method']}, layers {report['layers']}")
    for r in report["requests"]:
        print(f"\n{r['prompt']!r}: {r['target_true']!r} -> {r['target_new']!r}")
        print(f"  before  P(new) {pct(r['pre']['p_new'])}  P(true) {pct(r['pre']['p_true'])}   {r['pre']['continuation']!r}")
        print(f"  after   P(new) {pct(r['post']['p_new'])}  P(true) {pct(r['post']['p_true'])}   {r['post']['continuation']!r}")
    if report.get("superseded"):
        print(f"\nreplaces the earlier edit(s) of {', '.join(repr(f['prompt']) for f in report['superseded'])} "
              "(their keys left the preserved set)")
    if report.get("carried"):
        print(f"\nedits again, sharing a key with these requests: "
              f"{', '.join(repr(f['prompt'] + ' ' + f['target_new']) for f in report['carried'])} (earlier edits)")
    t = report["timings"]
    print(f"\ntimings: statistics {t['stats_s']:.1f} s, targets {t['targets_s']:.1f} s, keys {t['keys_s']:.1f} s, "
          f"solve {t['solve_s']:.2f} s, total {t['total_s']:.1f} s")


def _list_hparams() -> None:
    from lmedit.methods import get_method, method_names

    for name in method_names():
        cls = get_method(name).hparams_cls
        print(f"{name}: {cls.summary}")
        for field, default, help_text in cls.describe():
            print(f"  {field} = {json.dumps(default)}\n      {help_text}")


def cmd_edit(args) -> int:
    import lmedit

    if args.list_hparams:
        _list_hparams()
        return 0
    if args.requests is None:
        raise _UsageError("the following arguments are required: --requests (see `lmedit edit --help`)")
    requests = _requests(args, args.requests)
    overrides = _overrides(args)
    if args.save_model:
        _refuse_taken(args.save_model)  # before the edit, not after it
    model, tok = _load(args)
    result, report = _edit_report(model, tok, requests, args.method, args.preset, overrides, progress=not args.quiet,
                                  ledger=args.ledger, hparams=_hparams(args), stats_dir=args.stats_dir)
    if args.ledger:
        report["ledger"] = {"path": args.ledger, "batches": result.editor.ledger.n_batches,
                            "requests": result.editor.ledger.n_requests}
    if args.save_deltas:
        result.save_deltas(args.save_deltas)
        report["deltas"] = str(args.save_deltas)
    if args.lora_dir:
        owner = result.editor if args.ledger else result
        lora = owner.save_lora(args.lora_dir, rank=args.lora_rank, max_error=args.lora_max_error)
        report["lora"] = lora.to_dict()
        if not args.json:
            print(lora.describe())
    if args.save_model:
        _save_model(model, tok, args.save_model)
        report["model_dir"] = str(args.save_model)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        _print_table(report)
    return 0


def _refuse_taken(out: str) -> None:
    from lmedit.errors import CacheError

    if Path(out).exists() and (not Path(out).is_dir() or any(Path(out).iterdir())):
        raise CacheError(f"{out} exists and is not an empty directory; choose another path or remove it first")


def _save_model(model, tok, out: str) -> None:
    """The model and tokenizer as a Hugging Face directory (safetensors), written whole or not at all;
    an existing non-empty directory is refused, never replaced."""
    from lmedit._fs import atomic_path

    _refuse_taken(out)
    with atomic_path(out, directory=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)


def cmd_stats(args) -> int:
    import time

    from lmedit.core import stats as st

    t0 = time.perf_counter()
    if args.merge:
        if args.out is None or args.shard:
            raise _UsageError("--merge needs --out DIR (where the statistics go) and no --shard")
        merged = st.merge_partials(st.load_partials(args.merge))
        paths = st.write_moments(args.out, merged.plan, merged.moments())
        report = {"mode": "merge", "plan": merged.plan.meta(), "tokens": merged.count, "files": [str(p) for p in paths]}
    else:
        from lmedit.models.adapters import get_adapter
        from lmedit.presets import resolve_hparams

        if args.shard and args.out is None:
            raise _UsageError("--shard needs --out DIR for the partial sums")
        shard = st.parse_shard(args.shard) if args.shard else None  # a malformed I/N fails before the model loads
        model, tok = _load(args)
        adapter = get_adapter(model)
        _, hp = resolve_hparams(model, args.method, args.preset)
        kw = dict(corpus=args.corpus or hp.mom2_corpus, n_samples=args.n_samples or hp.mom2_n_samples,
                  max_length=args.max_length or hp.mom2_max_length, dtype=args.accumulate or hp.mom2_dtype,
                  forward_dtype=args.forward_dtype or hp.mom2_forward_dtype, max_tokens=args.max_tokens)
        layers = args.layers or list(hp.layers)
        for layer in layers:
            adapter.block(model, layer)  # range check before any work
        if shard is not None:
            plan = st.make_plan(model, layers, **kw)
            part = st.accumulate(model, tok, adapter, plan, corpus=kw["corpus"], shard=shard, checkpoint_dir=args.out,
                                 progress=not args.quiet)
            path = part.save(args.out)
            st.remove_checkpoint(args.out, plan, shard)
            report = {"mode": "shard", "shard": args.shard, "plan": plan.meta(), "tokens": part.count, "files": [str(path)]}
        else:
            from lmedit.distributed import rank_world

            st.second_moments(model, tok, adapter, layers, cache_dir=args.out, progress=not args.quiet, **kw)
            plan = st.make_plan(model, layers, **kw)
            root = args.out or st.cache_root() / "stats"
            report = {"mode": "full", "world_size": rank_world()[1], "plan": plan.meta(),
                      "files": [str(st.stat_path(root, plan.layer_meta(l))) for l in layers]}
    report["seconds"] = round(time.perf_counter() - t0, 2)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        plan = report["plan"]
        print(f"statistics ({report['mode']}) of {plan['model']}, layers {plan['layers']}, {plan['n_samples']} texts of "
              f"{plan['corpus']}, forward {plan['forward_dtype']}, accumulated in {plan['dtype']}: {report['seconds']} s")
        for f in report["files"]:
            print(f"  {f}")
    return 0


def cmd_trace(args) -> int:
    import lmedit

    facts = lmedit.load_facts(args.data)
    model, tok = lmedit.load_model(args.model, dtype=args.dtype)
    result = lmedit.trace(model, tok, facts, limit=args.n, samples=args.samples, noise=args.noise, window=args.window,
                          kinds=[k.strip() for k in args.kinds.split(",") if k.strip()], positions=args.positions,
                          compute_dtype=args.dtype_compute, seed=args.seed, progress=not args.quiet)
    if args.out:
        result.save(args.out)
    summary = result.summary()
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    print(f"{summary['facts']} facts traced ({summary['skipped']} skipped: not predicted by the model) in "
          f"{summary['seconds']:.0f} s; mean P(answer) clean {summary['mean_p_clean']:.3f}, corrupted "
          f"{summary['mean_p_corrupted']:.3f}")
    effect = summary["mlp_effect_at_last_subject_token"]
    if effect is not None:
        print("MLP indirect effect at the last subject token, per layer:")
        print("  " + " ".join(f"{l}:{e:.3f}" for l, e in enumerate(effect)))
    print(f"suggested layers: {summary['suggested_layers']}" + (f" (plots in {args.out})" if args.out else ""))
    return 0


def cmd_list(args) -> int:
    from lmedit.core.distribute import distribution_names, get_distribution
    from lmedit.methods import get_method, method_names
    from lmedit.models.loading import named_models

    listing = {
        "methods": [{"name": n, "summary": get_method(n).summary} for n in method_names()],
        "distributions": [{"name": n, "summary": get_distribution(n).summary} for n in distribution_names()],
        "models": [{"name": n, "summary": s} for n, s in named_models().items()],
    }
    if args.json:
        print(json.dumps(listing, indent=1))
        return 0
    for kind, entries in listing.items():
        print(f"{kind}:")
        width = max(len(e["name"]) for e in entries)
        for e in entries:
            print(f"  {e['name']:<{width}}  {e['summary']}")
    return 0


def cmd_demo(args) -> int:
    import importlib.resources

    import lmedit

    path = importlib.resources.files("lmedit") / "examples" / "demo_requests.json"
    requests = lmedit.load_requests(str(path))
    print("loading the embedded model (SmolLM2-135M-Instruct; converted once to a cache, then ~1 s)")
    model, tok = lmedit.load_model()
    overrides = {"mom2_forward_dtype": "auto", "compute_dtype": "auto"}
    print(f"editing {len(requests)} facts with {args.method} (statistics are computed once and cached)")
    _, report = _edit_report(model, tok, requests, args.method, None, overrides, progress=not args.quiet)
    _print_table(report)
    return 0


def cmd_eval(args) -> int:
    import lmedit
    from lmedit.evaluate.experiment import DEFAULT_MODEL_NAME, METRIC_KEYS, format_table, run_eval

    requests = _requests(args, args.data)
    kind = _kind(args)
    model, tok = _load(args)
    hp = _hparams(args)
    out = run_eval(model, tok, requests, method=args.method or (None if hp is not None else "emmet"), hparams=hp,
                   batch_size=args.batch_size, sequential=args.sequential,
                   kind=kind, generation=args.generation, chat=args.chat, easyedit=args.easyedit, model_name=args.model or DEFAULT_MODEL_NAME,
                   progress=not args.quiet, preset=args.preset, stats_dir=args.stats_dir, eval_dtype=args.eval_dtype,
                   **_overrides(args))
    if args.out:
        from lmedit._fs import atomic_path

        with atomic_path(args.out) as tmp:
            tmp.write_text(json.dumps(out, indent=1))
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        keys = [k for k in (*METRIC_KEYS, "rewrite_accuracy", "paraphrase_accuracy", "generation_entropy", "efficacy_accuracy", "specificity")
                if k in out["post"]]
        keys += [f"chat_{k}" for k in keys if f"chat_{k}" in out["post"]]
        keys += [k for k in ("rewrite_acc", "rephrase_acc", "locality") if k in out["post"]]
        rows = [{"": "pre", **out["pre"]}, {"": "post", **out["post"]}]
        print(f"{out['method']} on {out['n']} records, batch size {out['batch_size']}"
              f"{' (sequential)' if out['sequential'] else ''}")
        print(format_table(rows, ["", *keys]))
        t = out["timings"]
        print(f"timings: statistics {t['stats_s']:.1f} s, targets {t['targets_s']:.1f} s, keys {t['keys_s']:.1f} s, "
              f"residuals {t['residual_s']:.1f} s, solve {t['solve_s']:.1f} s, evaluation {t['eval_s']:.1f} s, total {t['total_s']:.1f} s "
              f"({t['edit_s_per_request']:.2f} s per edit)")
    return 0


def _ledger_undo(args, ledger) -> int:
    """`lmedit ledger undo`: drop the last --batches batches (files only)."""
    from lmedit.errors import CacheError

    n = len(ledger.batches) - bool(ledger.n_compacted)  # a compacted entry cannot be dropped
    if not 1 <= args.batches <= n:
        held = f" after the {ledger.n_compacted} compacted ones" if ledger.n_compacted else ""
        raise CacheError(f"ledger {ledger.path} holds {n} batch(es){held}; --batches must be 1..{n}, "
                         f"got {args.batches}")
    dropped = ledger.truncate(len(ledger.batches) - args.batches)
    report = {"path": str(ledger.path), "dropped": [b["index"] for b in dropped],
              "dropped_requests": sum(b["n_requests"] for b in dropped), "batches": ledger.n_batches,
              "requests": ledger.n_requests}
    print(json.dumps(report, indent=1) if args.json else
          f"ledger {ledger.path}: dropped batch(es) {report['dropped']} ({report['dropped_requests']} requests); "
          + (f"{report['batches']} batches, {report['requests']} requests left" if ledger.batches else
           "no batch is left: the directory is no ledger until the next `lmedit edit --ledger` into it"))
    return 0


def cmd_ledger(args) -> int:
    import lmedit
    from lmedit.ledger import Ledger

    ledger = Ledger.open(args.path)
    if args.ledger_command == "undo":  # files only: no model needed
        return _ledger_undo(args, ledger)
    model, tok = lmedit.load_model(args.model)
    adapter = lmedit.get_adapter(model)
    if args.ledger_command == "export":
        _refuse_taken(args.out)  # before the replay
        editor = lmedit.Editor.load(model, tok, ledger.path)  # checks the base model and every file first
        _save_model(model, tok, args.out)
        report = {"out": str(args.out), "ledger": str(ledger.path), "base_model": editor.base_fingerprint,
                  "batches": ledger.n_batches, "requests": ledger.n_requests}
        print(json.dumps(report, indent=1) if args.json else
              f"wrote {report['out']}: base model {report['base_model']} with the {report['batches']} batches "
              f"({report['requests']} requests) of {report['ledger']} applied")
        return 0
    if args.ledger_command == "compact":
        from lmedit.models.loading import fingerprint

        report = ledger.compact(model, adapter, fingerprint(model, adapter), keep_last=args.keep_last)
        print(json.dumps(report, indent=1) if args.json else
              f"ledger {report['path']}: {report['compacted']} batches ({report['requests']} requests) folded into one "
              f"exact total, {report['kept']} kept as they were; {report['bytes_before'] / 2**20:.1f} MiB -> "
              f"{report['bytes_after'] / 2**20:.1f} MiB")
        return 0
    if args.ledger_command == "lora":
        from lmedit.lora import save_lora
        from lmedit.models.loading import fingerprint

        ledger.check_base(model, adapter, fingerprint(model, adapter))
        report = save_lora(args.lora_dir, ledger.total_deltas(), model, adapter, rank=args.lora_rank,
                           max_error=args.lora_max_error, meta={"ledger": str(ledger.path), "batches": ledger.n_batches,
                                                                "n_requests": ledger.n_requests})
        print(json.dumps(report.to_dict(), indent=1) if args.json else report.describe())
        return 0
    layers = sorted({l for b in ledger.batches for l in b["layers"]})
    summary = ledger.summary({l: float(adapter.weight(model, l).detach().float().norm()) for l in layers})
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    print(f"ledger {summary['path']}: {summary['batches']} batches, {summary['requests']} requests, "
          f"methods {', '.join(summary['methods'])}, base model {summary['base_model']}"
          + (f", {summary['protected']} protected facts" if summary["protected"] else "")
          + (f", {summary['superseded']} fact{'s' * (summary['superseded'] != 1)} edited again"
             if summary["superseded"] else "")
          + (f" ({summary['carried']} of them with a new fact of their key)" if summary.get("carried") else "")
          + (f", the first {summary['compacted']} batches compacted" if summary["compacted"] else ""))
    for l, n in summary["update_norm"].items():
        rel = summary.get("relative_change", {}).get(l)
        print(f"  layer {l}: |sum of deltas| {n:.3f}" + (f" ({100 * rel:.1f}% of |W0|)" if rel is not None else ""))
    return 0


def _kind(args) -> str:
    """Which metrics fit the data: zsRE's for zsRE files, CounterFact's otherwise."""
    from lmedit.requests import file_format

    return "zsre" if (args.format or file_format(args.data)) == "zsre" else "counterfact"


def cmd_sweep(args) -> int:
    import lmedit
    from lmedit.evaluate.experiment import DEFAULT_MODEL_NAME, run_sweep

    if args.easyedit_hparams:
        raise ValueError("sweep takes its methods from --methods; --easyedit-hparams is for edit and eval")
    requests = _requests(args, args.data)
    kind = _kind(args)
    per_method: dict[str, dict[str, Any]] = {}
    for item in args.set_method:
        if ":" not in item:
            raise ValueError(f"--set-method expects METHOD:KEY=VALUE, got {item!r}")
        meth, kv = item.split(":", 1)
        per_method.setdefault(meth, {}).update(_parse_sets([kv]))
    from lmedit.methods import get_method

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        get_method(m)  # an unknown method fails now, not after the other methods' cells have run
    try:
        sizes = [int(x) for x in args.batch_sizes.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--batch-sizes must look like 1,16,64, got {args.batch_sizes!r}") from None
    if not methods or not sizes or min(sizes) < 1:
        raise ValueError(f"--methods and --batch-sizes need at least one entry each, batch sizes >= 1; "
                         f"got --methods {args.methods!r} --batch-sizes {args.batch_sizes!r}")
    model, tok = _load(args)
    rows = run_sweep(model, tok, requests, methods=methods, batch_sizes=sizes, out_dir=args.out,
                     kind=kind, model_name=args.model or DEFAULT_MODEL_NAME, preset=args.preset,
                     method_overrides=per_method, progress=not args.quiet, stats_dir=args.stats_dir,
                     eval_dtype=args.eval_dtype, **_overrides(args))
    from lmedit.distributed import is_main

    if is_main():  # rank 0 writes the tables
        print((Path(args.out) / "table.md").read_text())
    return 0 if rows else 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as e:
        print(f"lmedit: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    from lmedit._runtime import configure_logging, configure_threads

    from lmedit.distributed import finish, init_from_env

    rank, world = init_from_env()  # under torchrun: join the process group; rank 0 alone prints
    if rank != 0:
        sys.stdout = open(os.devnull, "w")
        args.quiet = True
    configure_logging(quiet=getattr(args, "quiet", False))
    configure_threads()
    from lmedit.errors import LmeditError

    handlers = {"stats": cmd_stats, "edit": cmd_edit, "list": cmd_list, "trace": cmd_trace, "demo": cmd_demo, "eval": cmd_eval, "sweep": cmd_sweep, "ledger": cmd_ledger}
    budget_env = os.environ.get("LMEDIT_MEMORY_BUDGET")
    try:
        if getattr(args, "memory_budget", None) is not None:  # read by every Editor of this command
            from lmedit._runtime import parse_bytes

            parse_bytes(args.memory_budget)
            os.environ["LMEDIT_MEMORY_BUDGET"] = args.memory_budget
        code = handlers[args.command](args)
        finish()
        return code
    except KeyboardInterrupt:
        print("lmedit: interrupted; no weight was left changed", file=sys.stderr)
        return 130
    except (LmeditError, ValueError, KeyError, IndexError, OSError) as e:
        if os.environ.get("LMEDIT_DEBUG"):
            raise
        msg = str(e) if not isinstance(e, KeyError) or isinstance(e, LmeditError) else str(e.args[0] if e.args else e)
        print(f"lmedit: error: {msg}", file=sys.stderr)
        return EXIT_ERROR
    finally:  # main() may run in-process (tests, notebooks): the caller's environment is put back
        if budget_env is None:
            os.environ.pop("LMEDIT_MEMORY_BUDGET", None)
        else:
            os.environ["LMEDIT_MEMORY_BUDGET"] = budget_env


if __name__ == "__main__":
    sys.exit(main())
