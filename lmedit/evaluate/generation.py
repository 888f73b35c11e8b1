"""Generation metrics: n-gram entropy ("fluency") of generated text.

Follows ``compute_n_gram_entropy`` / ``n_gram_entropy`` in kmeng01/rome and kmeng01/memit
(``experiments/py/eval_utils_counterfact.py``): per text, the entropy (bits) of the bigram and
trigram frequency distributions, weighted 2/3 and 4/3 and averaged (arithmetic mean); then the
arithmetic mean over texts. A low value means repetitive text. The papers' tables report this
number x100 (``summarize.py`` scales every key but ``time``/``essence_score``), e.g. ~620 for
an unedited GPT-J; the functions here return it in plain bits.

Tokenisation differs on purpose: the reference uses ``nltk.word_tokenize``, which needs a data
download, so lmedit splits words with the regex ``\\w+|[^\\w\\s]`` (runs of word characters, and
each other non-space character on its own). Case is kept, as in the reference. Results agree
with nltk on plain prose; they differ on contractions (nltk: ``do n't``; here: ``don ' t``)
and a few other punctuation cases.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

from lmedit.errors import LmeditError

__all__ = ["GenerationMetricError", "generation_entropy", "ngram_entropy", "word_tokens"]

_WORD_RE = re.compile(r"\w+|[^\w\s]")


class GenerationMetricError(LmeditError, ValueError):
    """Invalid input to a generation metric (no texts, bad n, mismatched weights)."""


def word_tokens(text: str) -> list[str]:
    """``word_tokens("Paris, France.") == ["Paris", ",", "France", "."]``: regex word split."""
    return _WORD_RE.findall(text)


def ngram_entropy(text: str, n: int) -> float:
    """``ngram_entropy("a b a b", 2) == 0.918...``: entropy (bits) of the text's n-grams.

    The text is split with :func:`word_tokens` (the regex ``\\w+|[^\\w\\s]``, standing in for
    the reference's ``nltk.word_tokenize``); the n-grams are counted and
    H = -sum_g f_g log2 f_g over their relative frequencies f_g. A text with fewer than n words
    (including the empty text) has no n-grams and entropy 0 (the reference would give NaN).
    """
    if n < 1:
        raise GenerationMetricError(f"ngram_entropy: n must be >= 1, got {n}")
    tokens = word_tokens(text)
    counts = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    total = sum(counts.values())
    if total == 0:
        return 0.0
    return -sum((c / total) * math.log2(c / total) for c in counts.values()) + 0.0


def generation_entropy(
    texts: Sequence[str],
    ns: Sequence[int] = (2, 3),
    weights: Sequence[float] = (2 / 3, 4 / 3),
) -> float:
    """``generation_entropy(["the cat sat on the mat"])``: weighted n-gram entropy, bits.

    Per text: ``mean(w_n * H_n for n in ns)`` with H_n from :func:`ngram_entropy` (the
    reference's ``np.mean([w * e for w, e in zip(weights, entropies)])``, defaults n = 2, 3
    with weights 2/3, 4/3); then the mean over texts. Not scaled by 100. Raises
    :class:`GenerationMetricError` (a ``ValueError``) on no texts or ``len(ns) != len(weights)``.
    """
    if isinstance(texts, str):
        raise GenerationMetricError(
            "generation_entropy: expected a sequence of texts, got one str; wrap it in a list"
        )
    if len(texts) == 0:
        raise GenerationMetricError("generation_entropy: no texts")
    if len(ns) == 0 or len(ns) != len(weights):
        raise GenerationMetricError(
            f"generation_entropy: need one weight per n, got ns={list(ns)} weights={list(weights)}"
        )
    per_text = [
        sum(w * ngram_entropy(t, n) for n, w in zip(ns, weights)) / len(ns) for t in texts
    ]
    return sum(per_text) / len(per_text)
