"""Process-level settings for the command line: threads and logging."""

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
