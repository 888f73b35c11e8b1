"""Atomic writes and the converted-model cache check (no model needed)."""

from __future__ import annotations

import hashlib
import os
import json

import pytest

from lmedit._fs import atomic_path
from lmedit.models.loading import _check_converted


def test_atomic_file_keeps_old_content_on_failure(tmp_path):
    target = tmp_path / "deltas.safetensors"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text("half written")
            raise KeyboardInterrupt
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["deltas.safetensors"]  # temporary removed
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"


def test_atomic_directory_replaces_only_when_complete(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(RuntimeError):
        with atomic_path(target, directory=True) as tmp:
            (tmp / "weights").write_text("partial")
            raise RuntimeError("conversion failed")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_path(target, directory=True) as tmp:
        (tmp / "weights").write_text("v1")
    with atomic_path(target, directory=True) as tmp:
        (tmp / "weights").write_text("v2")
    assert (target / "weights").read_text() == "v2"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_converted_model_cache_check(tmp_path, monkeypatch):
    d = tmp_path / "smollm"
    d.mkdir()
    assert _check_converted(d) == "no manifest"
    (d / "model.safetensors").write_bytes(b"x" * 10)
    (d / "lmedit-manifest.json").write_text(json.dumps({"files": {"model.safetensors": 10}}))
    assert "without checksums" in _check_converted(d)  # an older lmedit's manifest: converted again
    entry = {"size": 10, "sha256": hashlib.sha256(b"x" * 10).hexdigest()}
    (d / "lmedit-manifest.json").write_text(json.dumps({"files": {"model.safetensors": entry}}))
    assert _check_converted(d) is None
    st = (d / "model.safetensors").stat()
    (d / "model.safetensors").write_bytes(b"x" * 9 + b"y")  # same size, one byte flipped
    os.utime(d / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # a new mtime: checked in full
    assert "fails its sha256" in _check_converted(d)
    os.utime(d / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns))  # size and mtime as verified:
    assert _check_converted(d) is None  # trusted without hashing (the single-fact start-up path) ...
    monkeypatch.setenv("LMEDIT_VERIFY", "1")
    assert "fails its sha256" in _check_converted(d)  # ... unless a full check is asked for
    (d / "model.safetensors").write_bytes(b"x" * 4)  # truncated
    assert "wrong size" in _check_converted(d)
    (d / "lmedit-manifest.json").write_text("{not json")
    assert "corrupt manifest" in _check_converted(d)
