"""Follow-up questions: retrieval recall@5 of the gold paragraph with and without making them standalone.

    .venv/bin/python bench/followups.py [--limit 120] [--out results/followups]

The conversational set is built from XQuAD: for each paragraph with two or more questions, the first question is
turn 1 (answered with its gold answer) and the second question, rewritten to lean on turn 1, is the follow-up.
Rewrite rule: in the later question, the longest name (capitalised words, digits and "of"/"and" between them
allowed: "Super Bowl 50", "the Panthers") that the first question also names is replaced by a pronoun: "they"
for "the ...s", else "it" ("its"/"their" before "'s"); pairs that share no name are left out. Every later question
of a paragraph is paired with its first. "Who did the Panthers beat?" after "How many points did the Panthers
score?" becomes "Who did they beat?".

Rows: the original second question (the upper bound), the follow-up searched as asked, made standalone by the rule
(rag/conversation.py), and rewritten by the decoder (the packaged 135M model, greedy). Hybrid retrieval over all
240 paragraphs.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import cpu_flags, markdown_table, shared_dataset  # noqa: E402
from ingest.job import IngestJob  # noqa: E402
from rag.config import Settings  # noqa: E402
from rag.conversation import Turn, rewrite_messages, standalone_question  # noqa: E402
from rag.datasets import is_gold, read_dataset, write_contexts  # noqa: E402
from rag.embed import Embedder  # noqa: E402
from rag.evaluate import bootstrap_ci  # noqa: E402
from rag.generation import GenerationParams, load_generator  # noqa: E402
from rag.retrieve import Retriever  # noqa: E402
from rag.span import STOPWORDS  # noqa: E402
from rag.store import Store  # noqa: E402
from rag.types import DEFAULT_COLLECTION  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# A name: capitalised words (digits and "of"/"and" between them allowed), e.g. "Super Bowl 50", "Bank of England".
_NAME = re.compile(r"\b[A-Z][\w&.-]*(?:\s+(?:(?:of|and|de)\s+)?[A-Z0-9][\w&.-]*)*")


def lean_on(first: str, second: str) -> str | None:
    """`second` with the longest name it shares with `first` replaced by a pronoun (None: no shared name)."""
    shared = [match for match in _NAME.finditer(second)
              if match.group().lower() in first.lower() and match.group().split()[0].lower() not in STOPWORDS]
    if not shared:
        return None
    name = max(shared, key=lambda match: len(match.group()))
    start, end = name.span()
    with_article = second[max(0, start - 4):start].lower() == "the "
    plural = with_article and name.group().endswith("s")
    if with_article:
        start -= 4
    if second[end:end + 2] == "'s":
        pronoun, end = ("their" if plural else "its"), end + 2
    else:
        pronoun = "they" if plural else "it"
    if start == 0:
        pronoun = pronoun.capitalize()
    return second[:start] + pronoun + second[end:]


def conversational_set(dataset, limit: int, seed: int) -> list[dict]:
    by_paragraph: dict[str, list] = {}
    for item in dataset.items:
        by_paragraph.setdefault(item.gold_sources[0], []).append(item)
    pairs = []
    for key, items in by_paragraph.items():
        for second in items[1:]:
            follow_up = lean_on(items[0].question, second.question)
            if follow_up:
                pairs.append({"gold": key, "first": items[0].question, "first_answer": items[0].answers[0],
                              "original": second.question, "follow_up": follow_up})
    random.Random(seed).shuffle(pairs)
    return pairs[:limit] if limit else pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=120, help="pairs (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "followups")
    args = parser.parse_args()

    dataset = read_dataset(shared_dataset("xquad-en/xquad.en.json"))
    pairs = conversational_set(dataset, args.limit, args.seed)
    work = Path(tempfile.mkdtemp(prefix="bench-followups-"))
    embedder = Embedder()
    IngestJob(Settings(index_dir=work / "index"), embedder).run(write_contexts(dataset, work / "passages"))
    retriever = Retriever(Store.open(work / "index", embedder.name), embedder)
    generator = load_generator(Settings())
    params = GenerationParams(max_new_tokens=48)

    def hit_at_5(query: str, gold: str) -> float:
        hits = retriever.retrieve(query, 5, collection=DEFAULT_COLLECTION)
        return float(any(is_gold(hit.chunk.source, [gold]) for hit in hits))

    rows = {"original second question (upper bound)": [], "follow-up as asked": [],
            "follow-up, rule rewrite": [], "follow-up, decoder rewrite": []}
    examples, decoder_seconds = [], []
    for pair in pairs:
        history = [Turn(pair["first"], pair["first_answer"])]
        rule = standalone_question(history, pair["follow_up"])
        started = time.perf_counter()
        decoded = generator.generate(rewrite_messages(history, pair["follow_up"]), params).text.strip()
        decoded = decoded.split("\n")[0] or pair["follow_up"]
        decoder_seconds.append(time.perf_counter() - started)
        for name, query in zip(rows, (pair["original"], pair["follow_up"], rule, decoded)):
            rows[name].append(hit_at_5(query, pair["gold"]))
        if len(examples) < 8:
            examples.append({**pair, "rule": rule, "decoder": decoded})

    table_rows, results = [], {"pairs": len(pairs), "rows": {}, "examples": examples}
    for name, hits in rows.items():
        mean, low, high = bootstrap_ci(hits, 2000, args.seed)
        table_rows.append([name, len(hits), f"{mean:.3f} [{low:.3f}, {high:.3f}]"])
        results["rows"][name] = {"recall_at_5": mean, "ci95": [low, high]}
    table = markdown_table(["query searched", "pairs", "recall@5 of the gold paragraph [95% CI]"], table_rows)
    note = (f"Hybrid retrieval over {len(dataset.passages)} XQuAD paragraphs; decoder rewrite by the packaged "
            f"SmolLM2-135M, greedy, {sum(decoder_seconds) / max(len(decoder_seconds), 1):.2f} s per rewrite; "
            f"{platform.machine()}, CPU flags: {cpu_flags()}.")
    shown = "\n".join(f"- `{e['first']}` → `{e['follow_up']}`; rule searches `{e['rule']}`; decoder wrote "
                      f"`{e['decoder']}`" for e in examples[:4])
    print(f"{table}\n\n{note}\n\nExamples:\n{shown}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.md").write_text(f"# Follow-up questions\n\n{__doc__.strip()}\n\n{table}\n\n{note}\n\n"
                                        f"Examples:\n{shown}\n")
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
