"""The embedded GGUF split into pieces, joined, verified and converted with the low-memory path
(an empty model assigned the dequantised tensors) gives the embedded model's weights exactly."""

from __future__ import annotations

import hashlib

import pytest
import torch

from lmedit.models import loading
from lmedit.models.offline import join_pieces

pytestmark = pytest.mark.slow


def test_pieces_join_and_convert_to_the_embedded_weights(tmp_path, monkeypatch, embedded):
    gguf = loading._embedded_gguf()
    data = gguf.read_bytes()
    step = -(-len(data) // 3)
    pieces = []
    for i in range(3):
        p = tmp_path / f"m.gguf.part0{i}"
        p.write_bytes(data[i * step:(i + 1) * step])
        pieces.append(p)
    sha = hashlib.sha256(data).hexdigest()
    del data
    monkeypatch.setenv("LMEDIT_CACHE", str(tmp_path / "cache"))
    joined = join_pieces(pieces, tmp_path / "cache" / "gguf" / gguf.name, gguf.stat().st_size, sha)
    model, _ = loading.load_model(str(joined))  # a local .gguf file: converted once into the cache
    want = embedded[0].state_dict()
    got = model.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert loading.resolve_model_path(str(joined)) == loading.converted_dir(joined)  # the second time: the cache
