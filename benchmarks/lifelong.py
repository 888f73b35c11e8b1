"""Lifelong editing: N sequential edits in batches of B, evaluated every K edits, resumable.

Usage::

    python benchmarks/lifelong.py --methods memit,emmet,encore,alphaedit --n 2000 --batch-size 100 \
        --eval-every 500 --out results/lifelong2000 [--set encore:update_norm_lambda=10]

Every method edits a fresh copy of the embedded model through an Editor that appends each batch to
a ledger (``OUT/ledgers/METHOD``, not committed). A run that stops (killed, session over) resumes
where its ledger ends when the same command is run again: the ledger replays onto the base model
bit for bit, and batches, evaluation samples and probes are fixed by the data and seeds.

At 0 edits and every K edits: efficacy / paraphrase / neighbourhood scores over the facts edited
so far (all of them up to --sample-min, else a fixed random share --sample of at least that many),
the same on the first batch, retention of the known facts the unedited model answers
(``known_1209.json``; also among those whose subject no edit so far names, since an edit may rightly
change a known fact of its subject) and their answers' mean token log-probability, perplexity on
held-out Wikipedia paragraphs (after those used for the statistics), fluency of greedy
continuations, and |W - W0| / |W0| per edited layer. ``--start S`` edits records S.. instead of
0.. (a second sample of the same protocol, into another --out). ``--protect``
puts the keys of other records of the data (never edited) into a method's preserved set first. Writes
OUT/METHOD.json after every evaluation, then OUT/table.md and OUT/*.png over all methods.

``--frozen-targets DIR`` is a cheaper protocol for comparing what the solvers do: every batch reuses
target vectors precomputed on the unedited model (``benchmarks/distributions.py`` writes them,
``DIR/*.safetensors``) instead of optimising them on the model as it is, so an edit costs its keys
and solves only (17-27 s against 300-430 s a batch of 100 on two threads), every method moves to
the same targets, and the run-to-run spread that target optimisation brings (other thread counts
round differently) is gone. The methods' target settings become those the vectors were computed
with; MPES, a target setting, plays no part. The targets no longer adapt to earlier edits, and the
protocol measured harsher than the full one (results/README.md): compare its rows with each other,
not with full runs. A target is an absolute output (the unedited output plus its delta);
``--frozen-mode delta`` re-bases it on the model as it is (the subject's output now plus the
precomputed delta), which measured worse still. A frozen target knows nothing of an earlier edit of
the same key, so the protocol keeps earlier keys that a later edit reads again
(``supersede_edits=False``, as before that option existed).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import random
import sys
import time
from pathlib import Path

import torch

import lmedit
from lmedit._fs import atomic_path
from lmedit._runtime import configure_threads, peak_memory, resident_mb
from lmedit.cli import parse_value
from lmedit.core.keys import residual_stream
from lmedit.core.corpus import load_corpus
from lmedit.evaluate.retention import RetentionProbe, relative_change
from lmedit.evaluate.runner import evaluate_requests

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
KEYS = ("efficacy_score", "paraphrase_score", "neighborhood_score")


def batches_of(requests: list, size: int) -> list[list]:
    """Consecutive batches of ``size`` in record order; a record whose subject is already in the batch
    is carried to the next batch (a batch must not ask two things of one subject). Each batch
    depends only on the records before it, so a longer --n keeps the earlier batches."""
    out, carry, rest = [], [], iter(requests)
    while True:
        cur, later = [], []
        for r in carry:
            (later if len(cur) == size or any(r.subject == c.subject for c in cur) else cur).append(r)
        while len(cur) < size and (r := next(rest, None)) is not None:
            (later if any(r.subject == c.subject for c in cur) else cur).append(r)
        if not cur:
            return out
        out.append(cur)
        carry = later


def probe_texts(args) -> tuple[list[str], list[str]]:
    """Held-out paragraphs (after the statistics' 2,000) and fluency prompts (records never edited here)."""
    texts = load_corpus(args.corpus, 2000 + args.heldout)
    if len(texts) < 2000 + args.heldout:
        raise SystemExit(f"--corpus {args.corpus}: {len(texts)} texts, need {2000 + args.heldout} "
                         "(2,000 for the statistics, then the held-out ones)")
    paragraphs = texts[2000:]
    flat = json.loads(Path(args.data).read_text())
    return paragraphs, [r["locality_prompt"] for r in flat[-args.fluency_prompts:]]


def load_probe(state: dict, model, tok, args, edited: bool) -> RetentionProbe:
    """The probe of the unedited model: built now (and its known facts kept in ``state``), or reloaded."""
    paragraphs, fluency = probe_texts(args)
    digest = hashlib.sha256(json.dumps([paragraphs, fluency]).encode()).hexdigest()
    if state.setdefault("probe_texts_sha256", digest) != digest:  # a resumed run must measure the same texts
        raise SystemExit(f"the held-out paragraphs or fluency prompts differ from those this run measured before "
                         f"(--corpus {args.corpus}, --data {args.data}): resume with the first run's files")
    knowns = json.loads(Path(args.knowns).read_text())
    if "known" in state:
        known = state["known"]
        if "subjects" not in known:  # a results file of an earlier version: the subjects by prompt
            subject = {k["prompt"]: k["subject"] for k in knowns}
            known["subjects"] = [subject[p] for p in known["prompts"]]
        return RetentionProbe(known["prompts"], known["answers"], paragraphs, fluency,
                              known_subjects=known["subjects"])
    if edited:
        raise SystemExit("the ledger has batches but the results file has no probe: remove both to start again")
    probe = RetentionProbe.build(model, tok, [k["prompt"] for k in knowns], [k["attribute"] for k in knowns],
                                 paragraphs, fluency, known_subjects=[k["subject"] for k in knowns])
    state["known"] = {"prompts": probe.known_prompts, "answers": probe.known_answers,
                      "subjects": probe.known_subjects}
    return probe


def save(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(state, indent=1))


def evaluate(model, tok, edited: list, first: list, probe: RetentionProbe, W0: dict, adapter, args) -> dict:
    t0 = time.perf_counter()
    row: dict = {"edits": len(edited)}
    if edited:
        n = len(edited)
        k = n if n <= args.sample_min else max(args.sample_min, int(args.sample * n))
        sample = random.Random(0).sample(edited, k) if k < n else edited
        every = evaluate_requests(model, tok, sample)
        row.update({f"all_{m}": every[m] for m in KEYS}, all_sampled=k)
        firsts = evaluate_requests(model, tok, first)
        row.update({f"first_{m}": firsts[m] for m in KEYS})
        row["rel_change"] = relative_change(model, adapter, W0)
        row["rel_change_max"] = max(row["rel_change"].values())
        row["finite"] = all(bool(torch.isfinite(adapter.weight(model, l)).all()) for l in W0)
    row.update(probe.measure(model, tok, edited_subjects=[r.subject for r in edited]))
    row["eval_s"] = time.perf_counter() - t0
    return row


def open_editor(method: str, model, tok, ledger: Path, args, overrides: dict):
    if (ledger / "manifest.json").exists():
        return lmedit.Editor.load(model, tok, ledger, method, progress=not args.quiet)
    return lmedit.Editor(model, tok, method, ledger=ledger, keep_history=False, progress=not args.quiet, **overrides)


def request_key(r) -> tuple:
    """What a target file's provenance names a request by (``Editor``'s provenance ``requests``)."""
    return (r.prompt, r.subject, r.target_new)


class FrozenTargets:
    """Target vectors precomputed on the unedited model (``Editor.save_targets`` files in one
    directory), handed to each batch's edit whatever the model's weights are by then."""

    def __init__(self, *directories: str | Path) -> None:
        from lmedit.core.targets import read_targets

        self.files = sorted(f for d in directories for f in Path(d).glob("*.safetensors"))
        if not self.files:
            raise SystemExit(f"--frozen-targets: no target files (*.safetensors) in {directories[0]}")
        self.where: dict[tuple, tuple[Path, int]] = {}
        self.size: dict[Path, int] = {}
        configs = set()
        for f in self.files:
            _, prov = read_targets(f)
            self.size[f] = len(prov.get("requests", []))
            configs.add(json.dumps([prov.get("layer"), prov.get("anchor"), prov.get("config"),
                                    prov.get("templates")], sort_keys=True))
            for row, req in enumerate(prov.get("requests", [])):
                self.where.setdefault(tuple(req), (f, row))
        if len(configs) != 1:
            raise SystemExit(f"--frozen-targets: the files in {', '.join(map(str, directories))} were computed with "
                             f"{len(configs)} different layers, sites, settings or templates; keep one set per directory")
        self.layer, self.anchor, self.config, self.templates = json.loads(configs.pop())

    def missing(self, requests: list) -> list:
        return [r for r in requests if request_key(r) not in self.where]

    def overrides(self, label: str, own: dict) -> dict:
        """``own`` with the target settings the vectors were computed with (a conflicting --set is an error)."""
        clash = {k: v for k, v in own.items() if k in self.config and v != self.config[k]}
        if clash:
            raise SystemExit(f"{label}: --set {clash} changes target settings, but --frozen-targets reuses vectors "
                             f"computed with {self.config}")
        # targets optimised on the unedited model know nothing of an earlier edit of the same key, so
        # superseding it would drop that edit: the frozen protocol keeps every earlier key, as before;
        # and each request's vector is its own (computed in chunks that know nothing of the batches)
        return {"supersede_edits": False, "share_key_targets": False, **self.config, **own}

    def for_batch(self, editor, batch: list, mode: str = "absolute") -> "lmedit.TargetResult":
        """The batch's precomputed vectors; ``mode="delta"`` re-bases each on the current model (target =
        the subject's block output now + the delta optimised on the unedited model), so that an edit asks
        for the change alone and not also to undo what earlier edits did to the subject."""
        keys = [request_key(r) for r in batch]
        missing = [k for k in keys if k not in self.where]
        if missing:
            raise SystemExit(f"--frozen-targets: no precomputed target for {len(missing)} of the batch's requests, "
                             f"e.g. {missing[0]} (were --data, --start or --n changed since the run began?)")
        files = list(dict.fromkeys(self.where[k][0] for k in keys))
        offsets = {f: sum(self.size[g] for g in files[:i]) for i, f in enumerate(files)}
        joined = lmedit.TargetResult.concat([editor.load_targets(f, allow_other_weights=True) for f in files])
        if not joined.provenance:
            raise SystemExit(f"--frozen-targets: {', '.join(f.name for f in files)} do not join (computed from other "
                             "weights or settings); keep one set per directory")
        picked = joined.select([offsets[self.where[k][0]] + self.where[k][1] for k in keys])
        if mode == "absolute":
            return picked
        if self.anchor != "block":
            raise SystemExit(f"--frozen-mode delta re-bases block-output targets; these are at {self.anchor!r}")
        now = residual_stream(editor.model, editor.tokenizer, editor.adapter, batch, self.layer)
        return dataclasses.replace(picked, targets=now + picked.delta, init=now, value=None)  # v* no longer holds


def repo_relative(path: str | Path) -> str:
    """``path`` as recorded in a run's state: relative to the repository where it lies inside it."""
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def edited_records(args) -> list:
    """The records this run edits: --n of them from record --start of --data."""
    if args.start < 0:
        raise SystemExit(f"--start {args.start}: must be 0 or more")
    records = lmedit.load_requests(args.data, limit=args.start + args.n)
    if len(records) != args.start + args.n:
        raise SystemExit(f"--start {args.start} --n {args.n}: {args.data} has only {len(records)} records")
    return records[args.start:]


def check_start(args, labels: list[str]) -> None:
    """Before any work: the run's records are those --out began with, and not among the fluency prompts'."""
    out = Path(args.out)
    for path in [out / "unedited.json"] + [out / f"{label}.json" for label in labels]:
        if path.exists():
            begun = json.loads(path.read_text()).get("start", 0)
            if begun != args.start:
                raise SystemExit(f"{path} was begun with --start {begun}; resume it with --start {begun} "
                                 "(or write to another --out)")
    n_records = len(json.loads(Path(args.data).read_text()))
    if args.start + args.n > n_records - args.fluency_prompts:
        raise SystemExit(f"--start {args.start} --n {args.n}: the fluency prompts come from the last "
                         f"{args.fluency_prompts} of the {n_records} records of {args.data}, which must stay unedited")


def frozen_targets(args) -> FrozenTargets:
    """The --frozen-targets vectors, completed once (on the unedited model, into OUT/frozen_targets) with
    those the directory lacks for this run's requests (e.g. records its writer dropped as conflicts)."""
    extra = Path(args.out) / "frozen_targets"
    frozen = FrozenTargets(args.frozen_targets, extra)
    reqs = [r for b in batches_of(edited_records(args), args.batch_size) for r in b]
    if missing := frozen.missing(reqs):
        model, tok = load(args)
        editor = lmedit.Editor(model, tok, "memit", layers=[frozen.layer], progress=not args.quiet,
                               share_key_targets=False, **frozen.config)
        t0, n_missing = time.perf_counter(), len(missing)
        while missing:  # records the writer dropped may conflict with each other too: one file per conflict-free set
            part, missing = lmedit.requests.drop_conflicts(missing)
            tr = editor.compute_targets(part)
            got = [tr.provenance[k] for k in ("layer", "anchor", "config", "templates")]
            if json.dumps(got, sort_keys=True) != json.dumps([frozen.layer, frozen.anchor, frozen.config,
                                                              frozen.templates], sort_keys=True):
                raise SystemExit("--frozen-targets: the embedded MEMIT preset with the files' settings computes targets "
                                 "at another site or with other templates than the files'; compute the missing ones "
                                 "with the tool that wrote them")
            extra.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha256(json.dumps(tr.provenance["requests"]).encode()).hexdigest()[:12]
            editor.save_targets(tr, extra / f"{digest}.safetensors")
        print(f"frozen targets: computed the {n_missing} missing on the unedited model "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        frozen = FrozenTargets(args.frozen_targets, extra)  # refuses them if they differ in settings
    return frozen


def editable_weights(model, adapter) -> dict:
    """W0 per layer (d_out, d_in), float32 copies of every editable weight as loaded (the base model)."""
    return {l: adapter.weight(model, l).detach().to("cpu", torch.float32, copy=True)
            for l in range(adapter.n_layers(model))}


def protected_facts(spec: str, args) -> tuple[list, float]:
    """Records START..STOP of --data (and the weight) of a ``START:STOP[@WEIGHT]`` protect spec."""
    span, _, weight = spec.partition("@")
    start, stop = (int(x) for x in span.split(":"))
    if start < args.start + args.n and stop > args.start:
        raise SystemExit(f"--protect {spec}: records {start}-{stop - 1} overlap the edited ones "
                         f"({args.start}-{args.start + args.n - 1})")
    facts = lmedit.load_requests(args.data, limit=stop)[start:]
    if len(facts) != stop - start:
        raise SystemExit(f"--protect {spec}: {args.data} has only {start + len(facts)} records")
    return facts, float(weight) if weight else 1.0


def load(args):
    return lmedit.load_model(args.model, device_map=args.device_map)


def run_method(label: str, method: str, args, overrides: dict, protect: str | None = None,
               frozen: FrozenTargets | None = None) -> dict:
    path = Path(args.out) / f"{label}.json"
    state = json.loads(path.read_text()) if path.exists() else {"method": label, "rows": [], "edit_s": 0.0,
                                                                "targets_s": 0.0}
    frozen_dir = args.frozen_targets and repo_relative(args.frozen_targets) + ("" if args.frozen_mode == "absolute"
                                                                               else f" ({args.frozen_mode})")
    state["start"] = args.start  # check_start refused another one before any work
    if state["rows"] and state.get("frozen_targets") != frozen_dir:
        raise SystemExit(f"{path} was begun {'with --frozen-targets ' + str(state.get('frozen_targets')) if state.get('frozen_targets') else 'without --frozen-targets'}; "
                         "resume it the same way (or write to another --out)")
    state["frozen_targets"] = frozen_dir
    if frozen:
        overrides = frozen.overrides(label, overrides)
    model, tok = load(args)
    adapter = lmedit.get_adapter(model)
    batches = batches_of(edited_records(args), args.batch_size)
    W0 = editable_weights(model, adapter)  # before a ledger is replayed onto the model
    editor = open_editor(method, model, tok, Path(args.out) / "ledgers" / label, args, overrides)
    W0 = {l: W0[l] for l in editor.hparams.layers}
    done = editor.ledger.n_asked if editor.ledger else 0  # records of this run (not facts carried again)
    if protect and not done:  # once, before the first batch; a resumed run has them from its ledger
        facts, weight = protected_facts(protect, args)
        t0 = time.perf_counter()
        editor.protect(facts, weight=weight)
        state["protected"] = {"records": protect, "n": len(facts), "weight": weight, "s": time.perf_counter() - t0}
    if not done and any(r["edits"] for r in state["rows"]):
        # the ledger (not committed: it is large) is gone, e.g. on a new machine: the edits are
        # deterministic, so run them again and measure the rows again
        print(f"{label}: no ledger in {Path(args.out) / 'ledgers' / label}; editing again from the start and "
              f"replacing the rows after 0 edits", flush=True)
        state["rows"] = [r for r in state["rows"] if r["edits"] == 0]
        state["edit_s"] = state["targets_s"] = 0.0
        state.pop("batches", None)
    probe = load_probe(state, model, tok, args, edited=done > 0)
    dev = next(model.parameters()).device
    state.update(hparams=editor.hparams.to_dict(), command=" ".join(sys.argv), n=args.n, batch_size=args.batch_size,
                 device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", torch=torch.__version__)
    if not state["rows"]:
        state["rows"].append(evaluate(model, tok, [], [], probe, W0, adapter, args))
        save(path, state)
    if done and done % args.eval_every == 0 and all(r["edits"] != done for r in state["rows"]):
        edited = [r for b in batches for r in b][:done]  # killed between a batch and its evaluation
        state["rows"].append(evaluate(model, tok, edited, batches[0], probe, W0, adapter, args))
        save(path, state)
    n_done = 0
    for i, batch in enumerate(batches):
        n_done += len(batch)
        if n_done <= done:
            continue
        if args.until and n_done > args.until:
            break
        t0 = time.perf_counter()
        res = editor.edit(batch, targets=frozen.for_batch(editor, batch, args.frozen_mode) if frozen else None)
        state["edit_s"] += time.perf_counter() - t0
        state["targets_s"] += res.timings.get("targets_s", 0.0)
        # per batch: the phases' times and target steps (where a long run's time goes, batch by batch)
        phases = {k: v for k, v in res.timings.items() if isinstance(v, (int, float))}
        state.setdefault("batches", []).append({"edits": n_done, "edit_s": time.perf_counter() - t0, **phases,
                                                "target_steps": int(res.targets.steps.sum()),
                                                "rss_mb": resident_mb(), **peak_memory()})  # memory stays flat?
        state["hparams"] = editor.hparams.to_dict()  # with what the first batch measured (norm_reference)
        print(f"{label}: {n_done} edits ({time.perf_counter() - t0:.0f} s)", flush=True)
        if n_done % args.eval_every == 0 or i == len(batches) - 1:
            edited = [r for b in batches[: i + 1] for r in b]
            state["rows"].append(evaluate(model, tok, edited, batches[0], probe, W0, adapter, args))
            print(json.dumps({k: v for k, v in state["rows"][-1].items() if k != "rel_change"}), flush=True)
        save(path, state)
    return state


def unedited_reference(args) -> None:
    """OUT/unedited.json: the unedited model's scores on the first batch and on the first --sample-min
    records (what the edited model's first-batch and all-edited scores compare with); once per OUT."""
    path = Path(args.out) / "unedited.json"
    if path.exists():
        return
    model, tok = load(args)
    batches = batches_of(edited_records(args), args.batch_size)
    edited = [r for b in batches for r in b][: args.sample_min]
    first, every = evaluate_requests(model, tok, batches[0]), evaluate_requests(model, tok, edited)
    save(path, {"first": {m: first[m] for m in KEYS}, f"first_{len(edited)}": {m: every[m] for m in KEYS},
                "command": " ".join(sys.argv), "model": args.model or "embedded", "start": args.start})


def write_tables(out: Path) -> None:
    # run states only: other analyses (ablation, key capacity) may share the folder
    states = [s for s in (json.loads(p.read_text()) for p in sorted(out.glob("*.json")))
              if "rows" in s and "method" in s]
    cols = ["edits", "all_efficacy_score", "all_paraphrase_score", "all_neighborhood_score", "first_efficacy_score",
            "first_neighborhood_score", "known_retention", "known_retention_others", "known_logprob", "perplexity",
            "fluency", "rel_change_max"]
    lines = ["| method | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for s in states:
        for r in s["rows"]:
            lines.append(f"| {s['method']} | " + " | ".join(
                (f"{r[c]:.2f}" if isinstance(r.get(c), float) else str(r.get(c, ""))) for c in cols) + " |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 7, figsize=(28, 7))
    for ax, key in zip(axes.flat, cols[1:] + ["all_sampled"]):
        for s in states:
            pts = [(r["edits"], r[key]) for r in s["rows"] if key in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=s["method"])
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("edits")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "lifelong.png", dpi=100)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="memit,emmet,encore,alphaedit",
                    help="method names, or LABEL=METHOD entries (e.g. preserve=memit with "
                         "--set preserve:preserve_edits=true)")
    ap.add_argument("--data", default=str(DATA / "counterfact" / "counterfact_train_10000.json"))
    ap.add_argument("--model", default=None,
                    help="a named model, .gguf file or HF directory (default: the embedded one)")
    ap.add_argument("--device-map", default=None, help="passed to from_pretrained, e.g. cuda")
    ap.add_argument("--knowns", default=str(DATA / "knowns" / "known_1209.json"), help="known facts (ROME's schema)")
    ap.add_argument("--corpus", default="wikipedia-excerpt",
                    help="a corpus name or .jsonl/.txt file: its first 2,000 texts give the statistics (mom2_corpus, "
                         "unless --set gives another) and the --heldout after them the perplexity paragraphs")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--start", type=int, default=0, help="edit the --n records from this one of --data on (a second "
                    "sample of the same protocol; use another --out)")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--until", type=int, default=0, help="stop each method at this many edits (continue later)")
    ap.add_argument("--sample", type=float, default=0.2, help="share of the edited facts evaluated (fixed sample)")
    ap.add_argument("--sample-min", type=int, default=500, help="evaluate all edited facts up to this many")
    ap.add_argument("--heldout", type=int, default=64, help="held-out Wikipedia paragraphs for perplexity")
    ap.add_argument("--fluency-prompts", type=int, default=64)
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="METHOD:KEY=VALUE")
    ap.add_argument("--protect", action="append", default=[], metavar="LABEL=START:STOP[@WEIGHT]",
                    help="before LABEL's first batch, Editor.protect() records START..STOP of --data (not among "
                         "the edited ones), each key with WEIGHT (default 1) in the preserved set")
    ap.add_argument("--frozen-targets", default=None, metavar="DIR",
                    help="reuse target vectors precomputed on the unedited model (Editor.save_targets files, e.g. "
                         "results/distributions/targets/counterfact_train_10000) for every batch: the solvers "
                         "compared on equal targets, 17-27 s a batch of 100 against 300-430 s (see the module docstring)")
    ap.add_argument("--frozen-mode", choices=("absolute", "delta"), default="absolute",
                    help="absolute: each batch moves its subjects' outputs to the precomputed targets; delta: by the "
                         "precomputed change from where they are now (see the module docstring)")
    ap.add_argument("--out", default="results/lifelong")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    configure_threads()
    overrides: dict[str, dict] = {}
    for item in args.sets:
        method, kv = item.split(":", 1)
        key, value = kv.split("=", 1)
        overrides.setdefault(method, {})[key] = parse_value(value)
    protect = dict(item.split("=", 1) for item in args.protect)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    entries = [m.strip() for m in args.methods.split(",") if m.strip()]
    check_start(args, [e.partition("=")[0] for e in entries])
    frozen = frozen_targets(args) if args.frozen_targets else None
    unedited_reference(args)
    for entry in entries:
        label, _, method = entry.partition("=")
        own = overrides.get(label, {})
        if args.corpus != "wikipedia-excerpt":  # the statistics read the same corpus's first 2,000 texts
            own = {"mom2_corpus": args.corpus, **own}
        run_method(label, method or label, args, own, protect.get(label), frozen)
        write_tables(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
