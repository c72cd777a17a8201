"""Answer metrics with the official SQuAD v1.1 normalisation (the evaluation script's `normalize_answer`).

    >>> normalize_answer("The  Cat!")
    'cat'
    >>> round(token_f1("the Denver Broncos", "Denver Broncos won"), 3)
    0.8
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower-case, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace (SQuAD v1.1, in its order)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def answer_tokens(text: str) -> list[str]:
    return normalize_answer(text).split()


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    """Harmonic mean of token precision and recall on normalised bags of words.

    As in the v1.1 script, an empty side (after normalisation) scores 0, even when both are empty.
    """
    pred, ref = answer_tokens(prediction), answer_tokens(gold)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def best_exact_match(prediction: str, golds: Iterable[str]) -> float:
    """Max over the gold answers (SQuAD scores against every annotator's answer and keeps the best)."""
    return max((exact_match(prediction, gold) for gold in golds), default=0.0)


def best_f1(prediction: str, golds: Iterable[str]) -> float:
    return max((token_f1(prediction, gold) for gold in golds), default=0.0)


def balanced_accuracy(golds: list[str], predictions: list[str]) -> float:
    """Mean recall over the gold classes: a constant answer scores 1 / (number of classes) however skewed the
    labels are, so unlike accuracy it shows whether a classifier has any signal.

    >>> balanced_accuracy(["yes", "yes", "yes", "no"], ["yes", "yes", "yes", "yes"])
    0.5
    """
    hits, totals = Counter(), Counter(golds)
    for gold, predicted in zip(golds, predictions, strict=True):
        hits[gold] += gold == predicted
    return sum(hits[label] / total for label, total in totals.items()) / len(totals) if totals else float("nan")


def question_hash(question: str) -> str:
    """Identity of a question up to case, punctuation and articles: how training and evaluation questions are
    compared (`rag finetune` records its training questions' hashes, `rag eval` refuses them)."""
    import hashlib

    return hashlib.sha256(normalize_answer(question).encode()).hexdigest()
