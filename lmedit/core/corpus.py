"""Text corpora for second-moment statistics.

Example: ``texts = load_corpus("wikipedia-excerpt", n_samples=2000)``

* ``"wikipedia-excerpt"`` (offline default): about 400k words of 2016 English Wikipedia shipped
  in the ``gensim==4.4.0`` wheel, turned into prose by gensim's ``filter_wiki``; a sample is a
  paragraph of at least 20 words (5,052 in all, about 650k SmolLM2 tokens).
* a path to a ``.txt`` file (paragraphs separated by blank lines) or ``.jsonl`` (``"text"`` field).
* ``"wikipedia"``: Hugging Face ``datasets`` Wikipedia (online only; ``pip install datasets``).
"""

from __future__ import annotations

import bz2
import importlib.metadata
import json
import re
from pathlib import Path

from lmedit.errors import LmeditError

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def _paragraphs(text: str, min_words: int = 20) -> list[str]:
    out = []
    for para in re.split(r"\n\s*\n", text):
        para = " ".join(para.split())
        if len(para.split()) >= min_words:
            out.append(para)
    return out


def wikipedia_excerpt_path() -> Path:
    try:
        files = importlib.metadata.files("gensim") or []
    except importlib.metadata.PackageNotFoundError:
        raise LmeditError("the offline Wikipedia excerpt ships in gensim: pip install gensim==4.4.0 "
                          "(or `pip install lmedit[wiki]`), or pass corpus=PATH to a text file") from None
    for f in files:
        if str(f).endswith(WIKI_FILE):
            return Path(f.locate())
    raise LmeditError(f"gensim is installed but {WIKI_FILE} is missing from it")


def load_corpus(corpus: str, n_samples: int) -> list[str]:
    """The first ``n_samples`` texts of a corpus (see the module docstring)."""
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if corpus == "wikipedia-excerpt":
        from gensim.corpora.wikicorpus import extract_pages, filter_wiki

        texts: list[str] = []
        with bz2.open(wikipedia_excerpt_path(), "rb") as f:
            for _title, text, _pid in extract_pages(f):
                texts.extend(_paragraphs(filter_wiki(text)))
                if len(texts) >= n_samples:
                    break
        return texts[:n_samples]
    if corpus == "wikipedia":
        try:
            from datasets import load_dataset
        except ImportError:
            raise LmeditError("corpus 'wikipedia' needs the datasets package (pip install datasets) "
                              "and a network connection") from None
        ds = load_dataset("wikimedia/wikipedia", "20231101.en", split="train", streaming=True)
        return [row["text"] for _, row in zip(range(n_samples), ds)]
    path = Path(corpus)
    if not path.is_file():
        raise LmeditError(f"corpus {corpus!r} is neither 'wikipedia-excerpt', 'wikipedia' nor an existing file")
    if path.suffix == ".jsonl":
        texts = []
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if line.strip():
                    try:
                        texts.append(json.loads(line)["text"])
                    except (ValueError, KeyError, TypeError) as e:
                        raise LmeditError(f"{path}:{i + 1}: expected a JSON object with a 'text' field ({e})") from None
                if len(texts) >= n_samples:
                    break
    else:
        texts = _paragraphs(path.read_text(encoding="utf-8"), min_words=1)
    if not texts:
        raise LmeditError(f"corpus file {path} holds no text")
    return texts[:n_samples]


def corpus_id(corpus: str) -> str:
    """A stable identity of a corpus for cache keys (a file's name, size and mtime)."""
    if corpus in ("wikipedia-excerpt", "wikipedia"):
        return corpus
    p = Path(corpus)
    st = p.stat()
    return f"file:{p.name}:{st.st_size}:{int(st.st_mtime)}"
