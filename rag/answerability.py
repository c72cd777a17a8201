"""Does the index hold the answer? A calibrated check on the retrieved sources, made before the decoder runs.

A 135M decoder rarely says "I don't know" when its sources are about something else: it quotes whatever it was
given. Two cheap signals separate "the sources answer this" from "the closest sources are about something else":

- `similarity`: the best cosine similarity between the question's embedding and a retrieved source's;
- `coverage`: the largest share of the question's content words (normalised, function words dropped) that one
  retrieved source contains: an answering passage names what the question names.

A logistic model over them (fitted by `scripts/calibrate_answerability.py` on XQuAD questions of the articles the
shipped adapter was trained on, asked against an index with and without their article) gives `confidence`, the
estimated probability that the sources hold the answer. Below `threshold` (a setting; by default the fitted one,
chosen for at most 3% false abstentions on the calibration questions) the answer is "not answerable".

    >>> model = AnswerabilityModel({"similarity": 10.0, "coverage": 6.0}, bias=-6.0, threshold=0.25)
    >>> model.assess({"similarity": 0.7, "coverage": 0.8}).answerable
    True
    >>> model.assess({"similarity": 0.2, "coverage": 0.1}).answerable
    False
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rag.span import content_words
from rag.types import ScoredChunk

DEFAULT_MODEL_FILE = Path(__file__).parent / "data" / "answerability.json"
FEATURES = ("similarity", "coverage")


@dataclass(frozen=True, slots=True)
class Answerability:
    answerable: bool
    confidence: float  # estimated probability that the retrieved sources hold the answer, 0..1
    features: dict[str, float] = field(default_factory=dict)


def coverage(question: str, text: str) -> float:
    """Share of the question's distinct content words that occur in `text` (0 when the question has none)."""
    asked = set(content_words(question))
    if not asked:
        return 0.0
    return len(asked & set(content_words(text))) / len(asked)


def answerability_features(question: str, hits: Sequence[ScoredChunk], similarities: Sequence[float]) -> dict[str, float]:
    """The model's inputs for `hits` (rank order) and the question's cosine similarity to each of them."""
    if not hits:
        return {"similarity": 0.0, "coverage": 0.0}
    return {"similarity": max(similarities),
            "coverage": max(coverage(question, hit.chunk.indexed_text) for hit in hits)}


@dataclass(frozen=True, slots=True)
class AnswerabilityModel:
    weights: dict[str, float]
    bias: float
    threshold: float
    record: dict = field(default_factory=dict)  # how it was fitted: data, sizes, rates at the threshold

    @classmethod
    def load(cls, path: str | Path = DEFAULT_MODEL_FILE) -> AnswerabilityModel:
        data = json.loads(Path(path).read_text())
        return cls(data["weights"], data["bias"], data["threshold"], data.get("record", {}))

    def save(self, path: str | Path) -> None:
        body = {"weights": self.weights, "bias": self.bias, "threshold": self.threshold, "record": self.record}
        Path(path).write_text(json.dumps(body, indent=2) + "\n")

    def confidence(self, features: dict[str, float]) -> float:
        logit = self.bias + sum(weight * features[name] for name, weight in self.weights.items())
        return 1.0 / (1.0 + math.exp(-logit))

    def assess(self, features: dict[str, float], threshold: float | None = None) -> Answerability:
        confidence = self.confidence(features)
        cut = self.threshold if threshold is None else threshold
        return Answerability(confidence >= cut, round(confidence, 4), features)
