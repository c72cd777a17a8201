"""The terms the lexical index holds for a text: bm25s's English analysis, kept so FTS5 ranks like it did.

Lower-cased words of two or more word characters, English stopwords dropped, Snowball-stemmed ('timeouts' and
'timeout' meet). SQLite FTS5's own porter tokenizer measured 0.930 recall@1 on XQuAD against 0.935 for this
analysis, so FTS5 gets these terms (space-separated) instead of the raw text.
"""

from __future__ import annotations

import importlib.util
import re
from functools import lru_cache
from pathlib import Path

_WORD = re.compile(r"(?u)\b\w\w+\b")


def _english_stopwords() -> frozenset[str]:
    """bm25s's English stopword list, read from its module file: importing the bm25s package itself loads numba and
    scipy (0.3-1 s of every process start here), which nothing else in the service needs."""
    package = importlib.util.find_spec("bm25s")
    spec = importlib.util.spec_from_file_location(
        "_bm25s_stopwords", Path(package.submodule_search_locations[0]) / "stopwords.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return frozenset(module.STOPWORDS_EN)


_STOP = _english_stopwords()


@lru_cache(maxsize=1)
def _stemmer():
    import Stemmer

    return Stemmer.Stemmer("english")


def terms(text: str) -> list[str]:
    return _stemmer().stemWords([word for word in _WORD.findall(text.lower()) if word not in _STOP])


def indexed_terms(context: str, text: str) -> str:
    """What FTS5 indexes for a chunk (a SQL function in the triggers that keep FTS5 in step with the rows)."""
    return " ".join(terms(f"{context}\n{text}" if context else text))


def match_query(query_terms: list[str]) -> str | None:
    """An FTS5 query matching any of these (already analysed) terms; each quoted, so no user text is FTS5 syntax.
    Terms are word characters only (`terms`), so a quote cannot occur in one."""
    return " OR ".join(f'"{term}"' for term in dict.fromkeys(query_terms)) or None


def rarest_within(words: list[str], frequency: dict[str, int], budget: int) -> list[str]:
    """The rarest of `words` whose postings (`frequency`: chunks holding each word) add up to at most `budget`,
    and at least the rarest one: a query ranks with its most discriminating terms at a bounded cost."""
    kept, postings = [], 0
    for word in sorted(words, key=lambda word: frequency.get(word, 0)):
        postings += frequency.get(word, 0)
        if kept and postings > budget:
            break
        kept.append(word)
    return kept
