"""Atomic file writes and checksums: a file or directory appears complete or not at all."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any
from pathlib import Path


def cache_root() -> Path:
    """``$LMEDIT_CACHE``, else ``$XDG_CACHE_HOME/lmedit``, else ``~/.cache/lmedit``."""
    env = os.environ.get("LMEDIT_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "lmedit"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it onto ``final`` only if the block succeeds.

    Example: ``with atomic_path("deltas.safetensors") as tmp: save_file(tensors, tmp)``

    The target is never overwritten by a partial file: an exception (or KeyboardInterrupt) leaves
    whatever was at ``final`` untouched and removes the temporary.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if directory:
            if final.exists():
                old = final.with_name(f".{final.name}.old-{os.getpid()}")
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
        else:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
    except BaseException:
        if directory:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically (see :func:`atomic_path`); returns the path."""
    import json

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1))
    return Path(path)


def read_safetensors(path: str | os.PathLike, what: str, prefix: str = "") -> tuple[dict[str, str], dict[str, Any]]:
    """(metadata, tensors) of a safetensors file (those whose name starts with ``prefix``); ``CacheError``
    naming ``what`` (e.g. "delta file") and the path if it is missing, truncated or corrupt (safetensors
    raises several types for those)."""
    from safetensors import safe_open

    from lmedit.errors import CacheError

    path = Path(path)
    if not path.is_file():
        raise CacheError(f"{what} {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    except Exception as e:
        raise CacheError(f"{what} {path} is unreadable or corrupt ({e})") from e
