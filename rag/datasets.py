"""Question-answer datasets: SQuAD-format JSON (XQuAD), PubMedQA JSON, and a generic JSONL.

Each reader yields `QAItem`s; `write_contexts` turns a dataset's passages into one text file per passage, so the
dataset can be ingested as its own corpus with its gold passages known by path.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field
from pathlib import Path

from rag.errors import UserError

YES_NO_MAYBE = ["yes", "no", "maybe"]


@dataclass(frozen=True, slots=True)
class QAItem:
    id: str
    question: str
    answers: list[str]
    gold_sources: list[str] = field(default_factory=list)  # passage keys, e.g. "Super_Bowl_50/p03.txt"
    context: str | None = None  # the gold passage, when the dataset has one
    choices: list[str] | None = None  # closed-set questions (PubMedQA: yes/no/maybe)
    group: str = ""  # unit for train/test splits that must not share passages (article title, PMID)


@dataclass(slots=True)
class Dataset:
    name: str
    items: list[QAItem]
    passages: dict[str, str]  # passage key -> text

    def select(self, ids: set[str]) -> "Dataset":
        return Dataset(self.name, [item for item in self.items if item.id in ids], self.passages)


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:80]


def read_squad(path: Path) -> Dataset:
    data = json.loads(path.read_text())
    items, passages = [], {}
    for article in data["data"]:
        title = article.get("title", "untitled")
        for index, paragraph in enumerate(article["paragraphs"]):
            key = f"{_safe_name(title)}/p{index:02d}.txt"
            passages[key] = f"{title.replace('_', ' ')}\n\n{paragraph['context']}"
            for qa in paragraph["qas"]:
                answers = list(dict.fromkeys(answer["text"] for answer in qa["answers"]))
                items.append(QAItem(qa["id"], qa["question"], answers, [key], paragraph["context"], group=title))
    return Dataset(path.stem, items, passages)


def read_pubmedqa(path: Path) -> Dataset:
    data = json.loads(path.read_text())
    items, passages = [], {}
    for pmid, entry in data.items():
        contexts = entry["CONTEXTS"]
        if isinstance(contexts, str):  # some copies store the list as its Python repr
            contexts = ast.literal_eval(contexts)
        key = f"pubmed/{pmid}.txt"
        context = "\n".join(contexts)
        passages[key] = context  # the abstract only: its title is often the question, which would leak it
        items.append(QAItem(pmid, entry["QUESTION"], [entry["final_decision"]], [key], context,
                            choices=YES_NO_MAYBE, group=pmid))
    return Dataset(path.stem, items, passages)


def read_jsonl(path: Path) -> Dataset:
    items, passages = [], {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            answers = record.get("answers") or ([record["answer"]] if "answer" in record else [])
            item_id = str(record.get("id", number))
            context = record.get("context")
            gold = list(record.get("gold_sources") or [])
            if context and not gold:
                gold = [f"{_safe_name(path.stem)}/{_safe_name(item_id)}.txt"]
                passages[gold[0]] = context
            choices = record.get("choices") or (YES_NO_MAYBE if record.get("type") == "yes_no_maybe" else None)
            items.append(QAItem(item_id, record["question"], [str(a) for a in answers], gold, context, choices,
                                group=str(record.get("group", item_id))))
        except (KeyError, TypeError, json.JSONDecodeError) as error:
            raise UserError(f"{path}:{number}: not a {{question, answers[]}} record ({error})") from None
    return Dataset(path.stem, items, passages)


def read_dataset(path: str | Path) -> Dataset:
    """Reads SQuAD-format JSON, PubMedQA JSON or JSONL, told apart by content."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Dataset file '{path}' does not exist")
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    data = json.loads(path.read_text())
    if isinstance(data, dict) and "data" in data:
        return read_squad(path)
    if isinstance(data, dict) and all(isinstance(v, dict) and "QUESTION" in v for v in list(data.values())[:5]):
        return read_pubmedqa(path)
    raise UserError(f"'{path}' is neither SQuAD-format JSON, PubMedQA JSON nor JSONL")


def write_contexts(dataset: Dataset, folder: Path) -> Path:
    """One text file per passage under `folder`, named by its passage key. Returns the folder."""
    for key, text in dataset.passages.items():
        target = folder / key
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists() or target.read_text() != text:
            target.write_text(text)
    return folder


def is_gold(source: str, gold_sources: list[str]) -> bool:
    return any(source.endswith("/" + key) or source == key for key in gold_sources)
