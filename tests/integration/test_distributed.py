"""Data parallelism: statistics sharded and merged, or all-reduced over 2 gloo processes under
torchrun, equal one pass; partials of another plan, duplicate or missing shards are refused; eval
and sweep split over 2 processes gather one process's result.

The 2-process runs start ``torchrun`` (``python -m torch.distributed.run``) with one torch thread
per process, on a tiny llama saved to disk.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmedit.cli import main
from lmedit.core import stats as st
from lmedit.errors import CacheError
from lmedit.models.adapters import get_adapter

from helpers import COUNTERFACT_500 as COUNTERFACT
from helpers import needs_data

PLAN_KW = dict(corpus="wikipedia-excerpt", n_samples=24, max_length=48, dtype="float64", forward_dtype="model",
               max_tokens=128)
STATS_ARGS = ["--layers", "1,2", "--n-samples", "24", "--max-length", "48", "--max-tokens", "128",
              "--accumulate", "float64", "--forward-dtype", "model", "--quiet"]


@pytest.fixture(scope="module")
def work(tmp_path_factory, make_tiny, tokenizer) -> Path:
    root = tmp_path_factory.mktemp("dist")
    model = make_tiny("llama", seed=5)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return root


@pytest.fixture(scope="module")
def loaded(work):
    import lmedit

    return lmedit.load_model(str(work / "model"))


def _env(work: Path) -> dict[str, str]:
    return {**os.environ, "LMEDIT_CACHE": str(work / "cache"), "LMEDIT_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


def _torchrun(work: Path, *args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "lmedit", *args]
    proc = subprocess.run(cmd, env=_env(work), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _shards(model, tok, n: int) -> list[st.PartialSums]:
    adapter = get_adapter(model)
    plan = st.make_plan(model, [1, 2], **PLAN_KW)
    return [st.accumulate(model, tok, adapter, plan, corpus="wikipedia-excerpt", shard=(i, n), checkpoint_dir=None,
                          progress=False) for i in range(n)]


def test_shards_merge_to_exactly_one_pass(loaded, tmp_path):
    model, tok = loaded
    one = st.second_moments(model, tok, get_adapter(model), [1, 2], cache_dir=tmp_path / "one", progress=False, **PLAN_KW)
    parts = _shards(model, tok, 3)
    assert all(p.count > 0 for p in parts)  # 24 texts in chunks of 128 tokens: every shard has work
    for p in parts:
        p.save(tmp_path / f"host{p.shard[0]}")
    loaded_parts = st.load_partials([tmp_path / f"host{i}" for i in (2, 0, 1)])  # any order
    merged = st.merge_partials(loaded_parts)
    C = merged.moments()
    for layer in (1, 2):
        assert torch.equal(C[layer], one[layer])  # float64 sums of float32 chunk sums: exact, order-free
    # the merged files are ordinary statistics an Editor reads (--stats-dir)
    st.write_moments(tmp_path / "merged", merged.plan, C)
    again = st.second_moments(model, tok, get_adapter(model), [1, 2], cache_dir=tmp_path / "merged", progress=False,
                              **PLAN_KW)
    assert all(torch.equal(again[l], one[l]) for l in (1, 2))


def test_merge_refuses_other_plans_duplicates_missing_and_corrupt(loaded, tmp_path):
    model, tok = loaded
    parts = _shards(model, tok, 2)
    with pytest.raises(CacheError, match=r"missing statistics shard\(s\) \[1\] of 2"):
        st.merge_partials(parts[:1])
    with pytest.raises(CacheError, match=r"duplicate statistics shard\(s\) \[0\]"):
        st.merge_partials([parts[0], parts[0], parts[1]])
    other = st.make_plan(model, [1, 2], **{**PLAN_KW, "n_samples": 12})
    alien = st.PartialSums(other, (1, 2), parts[1].sums, parts[1].count)
    with pytest.raises(CacheError, match="different plans: n_samples '24' vs '12'"):
        st.merge_partials([parts[0], alien])
    three = st.PartialSums(parts[1].plan, (1, 3), parts[1].sums, parts[1].count)
    with pytest.raises(CacheError, match="cut into 2 and 3 shards"):
        st.merge_partials([parts[0], three])
    layers = st.make_plan(model, [1], **PLAN_KW)
    with pytest.raises(CacheError, match="layers '1,2' vs '1'"):
        st.merge_partials([parts[0], st.PartialSums(layers, (1, 2), {1: parts[1].sums[1]}, parts[1].count)])
    path = parts[0].save(tmp_path)
    data = bytearray(path.read_bytes())
    data[-64:] = bytes(64)
    path.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="checksum mismatch"):
        st.load_partials([tmp_path])
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(CacheError, match="not a readable statistics partial"):
        st.load_partials([tmp_path])
    with pytest.raises(CacheError, match="no statistics partials"):
        st.load_partials([tmp_path / "empty"])
    with pytest.raises(ValueError, match="shard must be i/N"):
        st.parse_shard("2/2")


def test_cli_shard_and_merge(work, loaded, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LMEDIT_CACHE", str(work / "cache"))
    model, tok = loaded
    for i in (0, 1):
        assert main(["stats", "--model", str(work / "model"), *STATS_ARGS, "--shard", f"{i}/2",
                     "--out", str(tmp_path / f"s{i}"), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["mode"] == "shard"
    assert main(["stats", "--merge", str(tmp_path / "s0"), "--out", str(tmp_path / "m")]) == 2  # shard 1 missing
    assert "missing statistics shard(s) [1] of 2" in capsys.readouterr().err
    assert main(["stats", "--merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(tmp_path / "m"),
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    one = st.second_moments(model, tok, get_adapter(model), [1, 2], cache_dir=tmp_path / "one", progress=False, **PLAN_KW)
    for layer, f in zip((1, 2), report["files"]):
        C = st.read_stat_file(Path(f), st.make_plan(model, [1, 2], **PLAN_KW).layer_meta(layer))
        assert torch.equal(C, one[layer])


def test_two_process_statistics_equal_one_process(work, loaded, tmp_path):
    model, tok = loaded
    proc = _torchrun(work, "stats", "--model", str(work / "model"), *STATS_ARGS, "--out", str(tmp_path / "two"), "--json")
    report = json.loads(proc.stdout)  # rank 0 alone prints
    assert report["world_size"] == 2
    one = st.second_moments(model, tok, get_adapter(model), [1, 2], cache_dir=tmp_path / "one", progress=False, **PLAN_KW)
    plan = st.make_plan(model, [1, 2], **PLAN_KW)
    for layer, f in zip((1, 2), report["files"]):
        C = st.read_stat_file(Path(f), plan.layer_meta(layer))
        rel = float((C - one[layer]).norm() / one[layer].norm())
        assert rel < 1e-12, rel


EVAL_ARGS = ["--data", str(COUNTERFACT), "--limit", "6", "--batch-size", "2", "--method", "emmet", "--layers", "1,2",
             "--set", "v_num_grad_steps=4", "--set", "context_templates=[[5,1]]", "--set", "mom2_n_samples=16",
             "--set", "mom2_max_length=48", "--json", "--quiet"]


@needs_data
def test_two_process_eval_equals_one_process(work, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LMEDIT_CACHE", str(work / "cache"))
    monkeypatch.setenv("LMEDIT_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    try:
        assert main(["eval", "--model", str(work / "model"), *EVAL_ARGS]) == 0
    finally:
        torch.set_num_threads(threads)
    one = json.loads(capsys.readouterr().out)
    two = json.loads(_torchrun(work, "eval", "--model", str(work / "model"), *EVAL_ARGS).stdout)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert two["pre"] == one["pre"] and two["post"] == one["post"]  # the same numbers, not just close
    assert one["post"]["efficacy_score"] != one["pre"]["efficacy_score"]  # the edits did something


@needs_data
def test_two_process_sweep_writes_one_process_cells(work, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LMEDIT_CACHE", str(work / "cache"))
    monkeypatch.setenv("LMEDIT_NUM_THREADS", "1")
    args = ["sweep", "--model", str(work / "model"), "--data", str(COUNTERFACT), "--methods", "memit",
            "--batch-sizes", "2", "--limit", "4", "--layers", "1,2", "--set", "v_num_grad_steps=4",
            "--set", "context_templates=[[5,1]]", "--set", "mom2_n_samples=16", "--set", "mom2_max_length=48", "--quiet"]
    threads = torch.get_num_threads()
    try:
        assert main([*args, "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    capsys.readouterr()
    _torchrun(work, *args, "--out", str(tmp_path / "two"))
    one = json.loads((tmp_path / "one" / "memit_b2.json").read_text())
    two = json.loads((tmp_path / "two" / "memit_b2.json").read_text())
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert two["post"] == one["post"] and two["pre"] == one["pre"]
    def table(d):  # every column but the timing
        with open(d / "table.csv") as f:
            return [{k: v for k, v in row.items() if k != "edit_s_per_request"} for row in csv.DictReader(f)]

    assert table(tmp_path / "two") == table(tmp_path / "one")
