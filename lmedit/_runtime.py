"""Process-level settings: threads, logging, and returning freed memory to the OS."""

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
