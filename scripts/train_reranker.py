"""Train the packaged cross-encoder reranker (rag/data/reranker) from development data; this script reproduces it.

    .venv/bin/python scripts/train_reranker.py [--workdir /tmp/rerank] [--out rag/data/reranker]
        [--financebench ../shared/datasets/financebench-dev] [--xquad ../shared/datasets/xquad-en/xquad.en.json]

Start: the first two layers (--layers) of the packaged all-MiniLM-L6-v2 weights with a one-logit head (BERT
sequence classification). Training groups (a question, its positive passage, negatives), never from evaluation
questions:

- financebench-dev, filings in the "tune" half of `bench.common.dev_split` only (the other half is what
  bench/evidence.py reports on): the tune filings are ingested once into <workdir>/index with `rag ingest`'s
  pipeline; positives are the chunks on the gold evidence page that share most of their words with the evidence
  text, negatives the hybrid retriever's other top chunks of the same filing.
- synthetic questions from the same tune filings' own chunks: a table row ("What was <row label> in <period>?")
  or a section heading ("What does the filing say about <heading>?") → that chunk; negatives are the hybrid
  retriever's top chunks of the same filing for that question that lack the row label / heading.
- XQuAD articles on the training side of the decoder adapter's split (its held-out ids are read from
  rag/data/adapter/training.json and their articles excluded): question → its paragraph; negatives are other
  paragraphs of the same article and of other training articles.

Loss: softmax cross-entropy over a group's positive and `negatives` hard negatives sampled from its pool (with one,
the pairwise logistic loss). A tenth of the group units (a stable hash of the filing question, synthetic question
or XQuAD article) is held out for validation. The model is exported to ONNX and quantised dynamically (int8
weights, 7-bit range); model.onnx is the int8 graph, and the record holds the fp32 graph's figures beside it.
`--measure-only` measures the last run's graphs again (validation, agreement, ms per query) without training.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import cpu_flags, dev_split, percentile, shared_dataset  # noqa: E402
from rag.models import default_embedding_path, sha256_files  # noqa: E402
from rag.rerank import MAX_TOKENS, MODEL_FILE, RECORD_FILE, PairEncoder, Reranker  # noqa: E402

VALIDATION_NEGATIVES = 2  # a validation group: its positive and this many hard negatives, the same for every run
NEGATIVE_POOL = 6  # negatives kept per group; each step samples `negatives` of them
TIMED_QUERIES = 8  # questions timed per graph, each with the same 30 candidates
RETRIEVED = 30  # hybrid candidates per question from which hard negatives are drawn
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
WORD = re.compile(r"[a-z0-9][a-z0-9.,%$]*")
PERIOD = re.compile(r"\b(?:(?:19|20)\d\d|Q[1-4]|fiscal|quarter|months|year|ended)\b", re.I)


@dataclass(slots=True)
class Group:
    question: str
    positive: str
    negatives: list[str]
    source: str  # financebench | synthetic-row | synthetic-heading | xquad
    unit: str  # what the train/validation split keeps together


@dataclass(slots=True)
class Settings:
    workdir: Path
    out: Path
    financebench: Path
    xquad: Path
    # Sized for 2 shared CPU cores (about 20 minutes): a 2-layer cross-encoder (the base's first two layers) costs
    # a third of the 6-layer one per pair, to train and to serve, so it sees three times the groups in that time;
    # one hard negative per step and group (a softmax over two is the pairwise logistic loss) halves it again.
    layers: int = 2
    steps: int = 32
    lr: float = 1e-4
    head_lr: float = 2e-3  # the pooler and one-logit head start random: at the encoder's rate they barely moved
    batch_groups: int = 4
    negatives: int = 1
    max_tokens: int = 192
    validation_share: int = 10  # one group unit in this many is validation
    validation_groups: int = 45  # most validation groups scored (each costs a forward pass per passage)
    synthetic_per_filing: int = 30
    xquad_groups: int = 250
    max_minutes: float = 15.0  # a safety stop on a much slower machine; the record says if it was hit
    seed: int = 0


def words(text: str) -> set[str]:
    return set(WORD.findall(text.lower()))


def tune_filings(financebench: Path) -> list[Path]:
    return [path for path in sorted((financebench / "pdfs").glob("*.pdf")) if dev_split(path.stem) == "tune"]


def build_index(settings: Settings) -> Path:
    """The tune filings ingested with the default pipeline (once; an existing index is reused)."""
    from ingest.job import IngestJob
    from rag.config import Settings as RagSettings
    from rag.embed import Embedder

    index = settings.workdir / "index"
    if (index / "store.sqlite").exists():
        return index
    corpus = settings.workdir / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for path in tune_filings(settings.financebench):
        if not (corpus / path.name).exists():
            (corpus / path.name).symlink_to(path)
    report = IngestJob(RagSettings(index_dir=index), Embedder()).run(corpus, follow_links=True)
    print(f"ingested {report.chunks_added} chunks of {len(report.files)} filings in {report.total_seconds:.0f} s")
    return index


class Filings:
    """The tune index: every chunk by filing, and the hybrid retriever restricted to one filing."""

    def __init__(self, index: Path):
        from rag.embed import Embedder
        from rag.retrieve import Retriever
        from rag.store import Store
        from rag.types import DEFAULT_COLLECTION

        self.collection = DEFAULT_COLLECTION
        store = Store.open(index)
        self.retriever = Retriever(store, Embedder())
        self.chunks: dict[str, list] = {}
        for chunk in store.iter_chunks(collection=self.collection):
            self.chunks.setdefault(Path(chunk.source).stem, []).append(chunk)
        for chunks in self.chunks.values():
            chunks.sort(key=lambda chunk: chunk.ordinal)

    def top(self, question: str, filing: str) -> list:
        hits = self.retriever.retrieve(question, RETRIEVED, source=f"*/{filing}.pdf", collection=self.collection)
        return [hit.chunk for hit in hits]


def financebench_groups(filings: Filings, questions: list[dict], negatives: int) -> list[Group]:
    groups = []
    for question in questions:
        filing = question["doc_name"]
        evidence = [item for item in question["evidence"] if item["doc_name"] == filing]
        pages = {item["page"] + 1 for item in evidence}
        evidence_words = words(" ".join(item["text"] for item in evidence))
        on_page = [chunk for chunk in filings.chunks.get(filing, []) if chunk.page in pages]
        # A chunk "contains the evidence" when most of its words are in the evidence text (page headers aside).
        positives = [chunk for chunk in on_page
                     if len(words(chunk.text) & evidence_words) >= 0.6 * max(1, len(words(chunk.text)))]
        ranked = [chunk for chunk in filings.top(question["question"], filing) if chunk.page not in pages]
        for positive in positives:
            groups.append(Group(question["question"], positive.indexed_text,
                                [chunk.indexed_text for chunk in ranked[:negatives]], "financebench",
                                f"fb:{question['id']}"))
    return groups


TABLE_ROW = re.compile(r"^\|\s*([A-Za-z][^|]{3,80}?)\s*\|(.*\d.*)\|\s*$")


def table_rows(text: str) -> list[tuple[str, str]]:
    """(row label, the first column header naming a period) of the chunk's Markdown table rows holding figures."""
    lines = text.splitlines()
    rows, period = [], ""
    for index, line in enumerate(lines):
        if index + 1 < len(lines) and lines[index + 1].startswith("| ---"):  # a header row
            period = next((cell.strip() for cell in line.strip("|").split("|") if PERIOD.search(cell)), "")
        elif (match := TABLE_ROW.match(line)) and len(words(label := match.group(1).strip(" :$"))) >= 2:
            rows.append((label, period))
    return rows


def synthetic_groups(filings: Filings, per_filing: int, negatives: int, rng: random.Random) -> list[Group]:
    groups = []
    for filing, chunks in sorted(filings.chunks.items()):
        candidates = []
        for chunk in chunks:
            for label, period in table_rows(chunk.text):
                question = f"What was {label} in {period}?" if period else f"What was {label}?"
                candidates.append((question, label, chunk, "synthetic-row"))
        seen = set()
        for chunk in chunks:  # a section's first chunk answers what the section is about
            if chunk.heading and chunk.heading not in seen and len(words(chunk.heading)) >= 2:
                seen.add(chunk.heading)
                candidates.append((f"What does the filing say about {chunk.heading}?", chunk.heading, chunk,
                                   "synthetic-heading"))
        rng.shuffle(candidates)
        for question, key, chunk, source in candidates[:per_filing]:
            key_words = words(key)
            ranked = [other for other in filings.top(question, filing)
                      if other.id != chunk.id and not key_words <= words(other.indexed_text)]
            if ranked:
                groups.append(Group(question, chunk.indexed_text, [c.indexed_text for c in ranked[:negatives]],
                                    source, f"syn:{question}"))
    return groups


def xquad_groups(path: Path, heldout_ids: set[str], limit: int, negatives: int, rng: random.Random) -> list[Group]:
    from rag.datasets import read_dataset

    items = read_dataset(path).items
    heldout_articles = {item.group for item in items if item.id in heldout_ids}
    training = [item for item in items if item.group not in heldout_articles]
    paragraphs: dict[str, list[str]] = {}
    for item in training:
        if item.context not in paragraphs.setdefault(item.group, []):
            paragraphs[item.group].append(item.context)
    articles = sorted(paragraphs)
    rng.shuffle(training)
    groups = []
    for item in training[:limit]:
        same = [text for text in paragraphs[item.group] if text != item.context]
        other = [text for article in rng.sample(articles, 3) if article != item.group
                 for text in rng.sample(paragraphs[article], 1)]
        pool = rng.sample(same, min(len(same), negatives)) + other
        groups.append(Group(item.question, item.context, pool, "xquad", f"xquad:{item.group}"))
    return groups, sorted(heldout_articles)


def is_validation(group: Group, share: int) -> bool:
    return zlib.crc32(group.unit.encode()) % share == 0


def train(settings: Settings, train_groups: list[Group]) -> tuple[object, dict]:
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    base = default_embedding_path()
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, local_files_only=True,
                                                               num_hidden_layers=settings.layers)
    pairs = PairEncoder(base, settings.max_tokens)
    head = [param for name, param in model.named_parameters() if name.startswith(("classifier", "bert.pooler"))]
    encoder = [param for name, param in model.named_parameters()
               if not name.startswith(("classifier", "bert.pooler"))]
    optimizer = torch.optim.AdamW([{"params": encoder, "lr": settings.lr}, {"params": head, "lr": settings.head_lr}],
                                  weight_decay=0.01)
    steps = settings.steps
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(1, steps // 10)) * max(0.0, 1 - step / max(1, steps)))
    history = {"train_loss": []}
    device = "cuda" if torch.cuda.is_available() else "cpu"  # a GPU trains the same recipe much longer, if lent
    model.to(device)

    def logits(question: str, passages: list[str]):
        encoded = pairs.encode(question, passages)
        feeds = {name: torch.from_numpy(array).to(device) for name, array in encoded.items()}
        return model(**feeds).logits[:, 0]

    started = time.perf_counter()
    model.train()
    order = []
    for step in range(steps):
        if not order:
            order = list(range(len(train_groups)))
            rng.shuffle(order)
        batch = [train_groups[order.pop()] for _ in range(min(settings.batch_groups, len(order)))]
        loss = 0.0
        for group in batch:
            chosen = rng.sample(group.negatives, min(settings.negatives, len(group.negatives)))
            scores = logits(group.question, [group.positive, *chosen])
            target = torch.zeros(1, dtype=torch.long, device=device)  # the positive is first
            loss = loss + torch.nn.functional.cross_entropy(scores[None, :], target)
        loss = loss / len(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        history["train_loss"].append([step + 1, round(loss.item(), 4)])
        elapsed = time.perf_counter() - started
        print(f"step {step + 1}/{steps} loss {history['train_loss'][-1][1]:.3f} {elapsed:.0f} s", flush=True)
        if elapsed > settings.max_minutes * 60:
            history["stopped_at_time_limit"] = True
            break
    history["steps"] = len(history["train_loss"])
    history["seconds"] = round(time.perf_counter() - started, 1)
    history["device"] = device
    return model.cpu().eval(), history


def export(model, folder: Path) -> None:
    """fp32 ONNX graph, and its dynamic int8 quantisation (MatMul weights per channel, embedding tables)."""
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    folder.mkdir(parents=True, exist_ok=True)
    fp32, int8 = folder / "model.fp32.onnx", folder / "model.int8.onnx"
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0  # a padded row, so the tracer keeps the mask
    sample = (torch.ones(2, 8, dtype=torch.long), mask, torch.zeros(2, 8, dtype=torch.long))
    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {name: {0: "batch", 1: "sequence"} for name in names} | {"logits": {0: "batch"}}

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.model(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).logits

    with torch.no_grad():
        torch.onnx.export(Logits().eval(), sample, str(fp32), input_names=names, output_names=["logits"],
                          dynamic_axes=axes, opset_version=17, dynamo=False)
    # reduce_range (7-bit weights): the shipped file must also run without VNNI, where 8-bit products saturate
    # (rag/embed_onnx.int8_weight_bits). Gather too: the fp32 word embeddings alone are 47 MB, over the 25 MB the
    # package allows; the record keeps the int8 graph's validation accuracy and its logits' distance to fp32.
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, per_channel=True, reduce_range=True,
                     op_types_to_quantize=["MatMul", "Gather"])


def measure(folder: Path, graph: Path, validation: list[Group], negatives: int, candidates: list[str]) -> dict:
    """Validation accuracy of one ONNX graph and its ms per query for len(candidates) passages (2 threads)."""
    shutil.copy(graph, folder / MODEL_FILE)
    reranker = Reranker(folder, threads=2)
    scores = [reranker.scores(group.question, [group.positive, *group.negatives[:negatives]]) for group in validation]
    top1 = sum(float(s[1:].max(initial=-1e9) < s[0]) for s in scores) / max(1, len(scores))
    reranker.scores(validation[0].question, candidates)  # warm up
    times = []
    for group in validation[:TIMED_QUERIES]:
        started = time.perf_counter()
        reranker.scores(group.question, candidates)
        times.append((time.perf_counter() - started) * 1000)
    return {"top1": round(top1, 4), "ms_p50": round(percentile(times, 50), 1),
            "ms_p90": round(percentile(times, 90), 1),
            "bytes": graph.stat().st_size, "scores": scores}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/rerank"))
    parser.add_argument("--out", type=Path, default=ROOT / "rag" / "data" / "reranker")
    parser.add_argument("--financebench", type=Path, default=None)
    parser.add_argument("--xquad", type=Path, default=None)
    parser.add_argument("--layers", type=int, help="encoder layers kept from the base (default 2)")
    parser.add_argument("--steps", type=int, help="optimiser steps (default 32)")
    parser.add_argument("--max-minutes", type=float, help="stop training after this long (default 15)")
    parser.add_argument("--measure-only", action="store_true",
                        help="measure the graphs of the last run in --workdir again and ship them (no training)")
    args = parser.parse_args()
    settings = Settings(workdir=args.workdir, out=args.out,
                        financebench=args.financebench or shared_dataset("financebench-dev"),
                        xquad=args.xquad or shared_dataset("xquad-en/xquad.en.json"),
                        **{key: value for key, value in (("layers", args.layers), ("steps", args.steps),
                                                         ("max_minutes", args.max_minutes)) if value is not None})
    rng = random.Random(settings.seed)
    questions_file = settings.financebench / "questions.jsonl"
    questions = [json.loads(line) for line in questions_file.read_text().splitlines() if line.strip()]
    tune = [question for question in questions if dev_split(question["doc_name"]) == "tune"]
    adapter_record = json.loads((ROOT / "rag" / "data" / "adapter" / "training.json").read_text())

    filings = Filings(build_index(settings))
    groups = financebench_groups(filings, tune, NEGATIVE_POOL)
    groups += synthetic_groups(filings, settings.synthetic_per_filing, NEGATIVE_POOL, rng)
    xquad, heldout_articles = xquad_groups(settings.xquad, set(adapter_record["split"]["heldout_ids"]),
                                           settings.xquad_groups, NEGATIVE_POOL, rng)
    groups += xquad
    groups = [group for group in groups if group.negatives]
    validation = [group for group in groups if is_validation(group, settings.validation_share)]
    validation = random.Random(settings.seed).sample(validation, min(len(validation), settings.validation_groups))
    train_groups = [group for group in groups if not is_validation(group, settings.validation_share)]
    counts = {"train": {}, "validation": {}}
    for name, part in (("train", train_groups), ("validation", validation)):
        for group in part:
            counts[name][group.source] = counts[name].get(group.source, 0) + 1
    print("groups", counts, flush=True)
    with open(settings.workdir / "groups.jsonl", "w") as handle:  # for inspection; not shipped
        for group in train_groups + validation:
            handle.write(json.dumps(asdict(group)) + "\n")

    work, base = settings.workdir / "export", default_embedding_path()
    record_path = settings.out / RECORD_FILE
    if args.measure_only:  # the graphs of the last run in workdir, measured again; its record kept
        record = json.loads(record_path.read_text())
    else:
        model, history = train(settings, train_groups)
        export(model, work)
        inputs = {"financebench_questions": questions_file, "xquad": settings.xquad,
                  "adapter_split": ROOT / "rag" / "data" / "adapter" / "training.json",
                  **{f"filing:{path.name}": path for path in tune_filings(settings.financebench)}}
        record = {
            "model": f"cross-encoder (BertForSequenceClassification, 1 logit): the first {settings.layers} layers "
                     "of all-MiniLM-L6-v2",
            "base_model": {"name": base.parent.name, "sha256": sha256_files(base / "model.safetensors")},
            "data": {key: {"path": str(path), "sha256": sha256_files(path)} for key, path in inputs.items()},
            "split": {"financebench": "filings with bench.common.dev_split(doc_name) == 'tune' only",
                      "xquad": "articles of the decoder adapter's training side only",
                      "xquad_excluded_articles": heldout_articles,
                      "validation": f"groups whose unit's crc32 % {settings.validation_share} == 0 "
                                    f"(at most {settings.validation_groups}, each with {VALIDATION_NEGATIVES} "
                                    "hard negatives)"},
            "counts": counts, "pairs": {name: sum(len(group.negatives) + 1 for group in part)
                                        for name, part in (("train", train_groups), ("validation", validation))},
            "hyperparameters": {key: (str(value) if isinstance(value, Path) else value)
                                for key, value in asdict(settings).items()},
            "loss": "softmax cross-entropy over the positive and `negatives` sampled hard negatives per group",
            "max_tokens": settings.max_tokens, "train_loss": history["train_loss"],
            "steps": history["steps"], "seconds": history["seconds"], "device": history["device"],
            "stopped_at_time_limit": history.get("stopped_at_time_limit", False),
            "command": "scripts/train_reranker.py",
        }
    for name in TOKENIZER_FILES:
        shutil.copy(base / name, work / name)
    # measured with the length it was trained on, as the shipped record makes rag.rerank use it
    (work / RECORD_FILE).write_text(json.dumps({"max_tokens": settings.max_tokens}))
    candidates = [group.positive for group in train_groups[:30]]
    measured = {precision: measure(work, work / f"model.{precision}.onnx", validation, VALIDATION_NEGATIVES,
                                   candidates) for precision in ("fp32", "int8")}
    differences = [abs(a - b).max() for a, b in zip(measured["fp32"].pop("scores"), measured["int8"].pop("scores"))]
    # int8 is the graph shipped: the fp32 one is over the package's 25 MB (its word embeddings alone are 47 MB);
    # fp32 is measured beside it so that the record shows what quantisation costs in accuracy and gains in speed.
    if measured["int8"]["top1"] < measured["fp32"]["top1"] - 2 / max(1, len(validation)):
        print("warning: the int8 graph ranks validation groups worse than fp32", measured, file=sys.stderr)
    settings.out.mkdir(parents=True, exist_ok=True)
    shutil.copy(work / "model.int8.onnx", settings.out / MODEL_FILE)
    for name in TOKENIZER_FILES:
        shutil.copy(base / name, settings.out / name)
    record.update({
        "graphs": measured, "shipped": "int8",
        "fp32_vs_int8": {"max_abs_logit_difference": round(float(max(differences)), 4),
                         "median_max_abs_logit_difference": round(float(percentile(differences, 50)), 4)},
        "ms_per_query": {"candidates": len(candidates), "threads": 2, "cpu_flags": cpu_flags(),
                         "p50": measured["int8"]["ms_p50"]},
        "model_sha256": sha256_files(settings.out / MODEL_FILE),
    })
    record_path.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({key: record[key] for key in ("counts", "pairs", "graphs", "fp32_vs_int8",
                                                   "ms_per_query", "model_sha256")}, indent=1))

if __name__ == "__main__":
    main()
