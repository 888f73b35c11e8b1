"""Process-level settings: threads, logging, the memory budget, and returning freed memory to the OS."""

from __future__ import annotations

import logging
import os


def configure_threads() -> int:
    """Use one torch thread per core available to this process (``LMEDIT_NUM_THREADS`` overrides).

    torch's default can exceed the cores a process may use (containers, CPU affinity), and
    oversubscribed threads make two torch processes on one machine many times slower.
    """
    import torch

    env = os.environ.get("LMEDIT_NUM_THREADS")
    if env:
        n = max(1, int(env))
    else:
        try:
            n = len(os.sched_getaffinity(0))
        except AttributeError:
            n = os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def configure_logging(quiet: bool, verbose: bool = False) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "huggingface_hub", "gensim", "smart_open", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def release_freed_memory() -> bool:
    """Return freed heap memory to the OS (glibc ``malloc_trim``); False where there is no glibc.

    An edit frees large temporaries (a bfloat16 copy of the model, KV caches, covariances); glibc
    keeps such freed pages in the process, so without this a long run of edits shows resident
    memory growing although nothing is alive. Costs milliseconds.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}


def parse_bytes(text: str | int | float) -> int:
    """``"8GB"`` / ``"512 MiB"`` / ``2e9`` -> bytes (units are powers of 1024)."""
    import re

    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
        if m is None or m.group(2).lower() not in _UNITS:
            raise ValueError(f"memory size {text!r}: write a number with an optional unit, e.g. 8GB or 512MiB")
        value, unit = float(m.group(1)), m.group(2).lower()
    if value <= 0:
        raise ValueError(f"memory size {text!r} must be positive")
    return int(value * _UNITS[unit])


def available_memory(device=None) -> int | None:
    """Bytes a new allocation can take now: free memory of a CUDA device, else the system's
    MemAvailable (Linux; None where it cannot be read)."""
    import torch

    if device is not None and torch.device(device).type == "cuda":
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def memory_budget(device=None, given: str | int | float | None = None) -> int | None:
    """The bytes one phase of an edit may allocate: ``given``, else ``LMEDIT_MEMORY_BUDGET`` (e.g.
    ``8GB``), else what is available now (:func:`available_memory`); None: no bound known."""
    if given is not None:
        return parse_bytes(given)
    env = os.environ.get("LMEDIT_MEMORY_BUDGET")
    if env:
        try:
            return parse_bytes(env)
        except ValueError as e:
            raise ValueError(f"LMEDIT_MEMORY_BUDGET: {e}") from None
    return available_memory(device)


def resident_mb() -> float | None:
    """The process's resident memory now (MiB; Linux's /proc/self/statm), None where it cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def peak_memory() -> dict[str, float]:
    """The process's peak resident memory so far (MiB, from getrusage: model loading included) and,
    where CUDA is in use, the peak memory torch allocated on each GPU (MiB)."""
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"peak_rss_mb": rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        for i in range(torch.cuda.device_count()):
            out[f"peak_cuda{i}_mb"] = torch.cuda.max_memory_allocated(i) / 2**20
    return out
