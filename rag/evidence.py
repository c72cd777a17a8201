"""Evidence: the spans of the sources that answer a question, quoted so that a reader can check them at a glance.

A source chunk is cut into units a reader can check: a table row (shown under its table's caption and column
headers, which say what its figures are and in which unit), a sentence, or a code block. Each unit is scored for the
question: its analysed terms against the question's (weighted by how rare each is among the candidates' units, as
BM25 weighs them), the periods the question names found in the row or its headers, a figure where the question
asks for one, code where it asks how to do something, and the rank of its chunk (the reranker's order). The best units, covering what the question asks
with as few quotes as possible, are the answer's evidence: document, page of the quoted words, and the character
offsets of the quote in its chunk (`chunk.text[start:end] == quote`).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

from rag.store.terms import terms
from rag.types import Chunk, ScoredChunk

MAX_EVIDENCE = 5
EVIDENCE_CHUNKS = 5  # the first chunks of the ranking that evidence is taken from
MIN_SHARED_TERMS = 1  # a unit must share at least this many question terms to be evidence
MAX_SENTENCE_CHARS = 600  # a longer "sentence" (a paragraph without stops) is quoted up to a sentence-like break
YEAR = re.compile(r"(?<!\d)(?:19|20)\d\d(?!\d)")  # also inside "FY2018"
FIGURE = re.compile(r"[$€£]?\(?-?\d[\d,]*(?:\.\d+)?\)?\s*(?:%|percent|million|billion|thousand)?")
ASKS_FIGURE = re.compile(r"\b(?:how\s+(?:much|many)|what\s+(?:is|was|were|are)\s+(?:the\s+)?(?:\w+\s+){0,6}?"
                         r"(?:amount|total|value|number|ratio|margin|rate|percentage|revenue|income|cash|expense|"
                         r"cost|capex|expenditure|assets|liabilities|debt|eps|dividend)|percent|ratio|margin|"
                         r"\$|usd|millions?|billions?)\b", re.I)
CHANGE = re.compile(r"\b(?:chang\w*|grow\w*|growth|increas\w*|decreas\w*|declin\w*|differ\w*)\b", re.I)
AMOUNT = re.compile(r"^[$€£]?\s*(\()?\s*[$€£]?\s*(-?[\d,]*\.?\d+)\s*(\))?\s*%?$")
HOW_TO = re.compile(r"\bhow\s+(?:do|can|should|would)\s+(?:i|we|you|one)\b|\bhow\s+to\b|\bexample\b", re.I)
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\"“])")
CODE_FENCE = re.compile(r"^```.*?^```[ \t]*$", re.M | re.S)
# A line of code or a console session: a prompt (">>>", "$ "), an import, an assignment or a call, no prose.
CODE_LINE = re.compile(r"^(?:>>>|\.\.\.|\$ |pip install |import \w|from [\w.]+ import |[\w.\[\]'\"]+ = \S|[\w.]+\(.*\)$|"
                       r"[A-Z]\w*\(.*\)$|[<{}\])]|#\s)")
# Code names its words in identifiers ("follow_redirects=True", "httpx.BasicAuth"): split for matching the question.
IDENTIFIER_PARTS = re.compile(r"[_.=()\[\]{}'\"]|(?<=[a-z])(?=[A-Z])")
TABLE_RULE = re.compile(r"^\|(?:\s*:?-{3,}:?\s*\|)+\s*$")


def asks_figure(question: str) -> bool:
    """The question asks for an amount, count, ratio or percentage."""
    return bool(ASKS_FIGURE.search(question))


def asks_how_to(question: str) -> bool:
    return bool(HOW_TO.search(question))


@dataclass(frozen=True, slots=True)
class Evidence:
    """A quoted span of one source. `header`: for a table row, its table's caption and column header rows (shown
    above the row; not part of the quote)."""

    number: int  # the source's [n] in the answer's sources
    chunk_id: int | None
    doc_id: str
    source: str
    page: int | None  # the page of the quoted words
    start: int  # character offsets of the quote in the chunk's text
    end: int
    quote: str
    kind: str  # "row", "sentence" or "code"
    header: str = ""
    score: float = 0.0

    @property
    def cells(self) -> list[str]:
        return _cells(self.quote) if self.kind == "row" else []

    def readable(self) -> str:
        """The quote as a sentence a reader takes in at once: a row's label, then each figure under its column's
        header ("Total gross margin percentage: 44.3 % (June 30, 2024); 43.1 % (June 30, 2023)")."""
        if self.kind != "row":
            return self.quote
        label, *values = self.cells or [self.quote]
        columns = _column_names(self.header)
        shown = []
        for position, value in enumerate(values, start=1):
            if not value:
                continue
            name = columns[position] if position < len(columns) else ""
            shown.append(f"{value} ({name})" if name else value)
        return f"{label}: {'; '.join(shown)}" if shown else label


@dataclass(frozen=True, slots=True)
class _Unit:
    start: int
    end: int
    kind: str
    header: str


def _cells(row: str) -> list[str]:
    return [cell.strip() for cell in row.strip().strip("|").split("|")]


def _column_names(header: str) -> list[str]:
    """Per column, the words of the header rows above it, joined ("Three Months Ended June 30, 2024")."""
    rows = [_cells(line) for line in header.splitlines() if line.startswith("|") and not TABLE_RULE.match(line)]
    if not rows:
        return []
    width = max(map(len, rows))
    return [" ".join(row[i] for row in rows if i < len(row) and row[i]).strip() for i in range(width)]


def units(text: str) -> list[_Unit]:
    """A chunk's checkable units in order: code blocks (fenced, or runs of code-like lines: loaders drop Markdown's
    fences), table rows (with their table's header), sentences."""
    found: list[_Unit] = []
    covered: list[tuple[int, int]] = []
    for match in CODE_FENCE.finditer(text):
        found.append(_Unit(match.start(), match.end(), "code", ""))
        covered.append((match.start(), match.end()))
    offset, header_lines, in_table = 0, [], False
    code: list[int] = []  # start and end of the run of code-like lines being read

    def close_code() -> None:
        if code:
            found.append(_Unit(code[0], code[1], "code", ""))
            code.clear()

    for line in text.splitlines(keepends=True):
        start, end = offset + len(line) - len(line.lstrip()), offset + len(line.rstrip())
        offset += len(line)
        if any(low <= start < high for low, high in covered):
            continue
        stripped = line.strip()
        if not stripped:
            close_code()
            header_lines, in_table = [], False
            continue
        if stripped.startswith("|"):
            close_code()
            if TABLE_RULE.match(stripped):
                in_table = True  # the rows above were the header
                continue
            if not in_table and _is_header_row(stripped):
                header_lines.append(stripped)
                continue
            in_table = True
            found.append(_Unit(start, end, "row", "\n".join(header_lines)))
            continue
        if CODE_LINE.match(stripped):
            code[:] = [code[0] if code else start, end]
            continue
        close_code()
        if in_table:  # prose after a table: a new block (its caption lines start a fresh header)
            header_lines, in_table = [], False
        header_lines.append(stripped)
        found.extend(_sentences(text, start, end))
    close_code()
    return sorted(found, key=lambda unit: unit.start)


def _is_header_row(row: str) -> bool:
    """A row of column labels (periods, 'Change'), not figures: no cell after the first holds a plain amount."""
    values = _cells(row)[1:]
    return not any(re.fullmatch(r"[$€£]?\s*\(?-?[\d,]+(?:\.\d+)?\)?\s*%?", value) and not YEAR.fullmatch(value)
                   for value in values)


def _sentences(text: str, start: int, end: int) -> list[_Unit]:
    spans, position = [], start
    for match in SENTENCE_END.finditer(text, start, end):
        spans.append((position, match.start()))
        position = match.end()
    spans.append((position, end))
    result = []
    for low, high in spans:
        while high - low > MAX_SENTENCE_CHARS:  # a run-on paragraph: cut at the last space within the limit
            cut = text.rfind(" ", low, low + MAX_SENTENCE_CHARS)
            cut = cut if cut > low else low + MAX_SENTENCE_CHARS
            result.append(_Unit(low, cut, "sentence", ""))
            low = cut + 1
        if text[low:high].strip():
            result.append(_Unit(low, high, "sentence", ""))
    return result


def _page(chunk: Chunk, unit: _Unit) -> int | None:
    """The page of a unit's words: a table row of a chunk whose caption ends the page before is on its last page."""
    if chunk.page_end and unit.kind == "row":
        return chunk.page_end
    return chunk.page


def select_evidence(question: str, hits: list[ScoredChunk], limit: int = MAX_EVIDENCE) -> list[Evidence]:
    """The quoted spans of the first `EVIDENCE_CHUNKS` hits that best answer `question`, best first."""
    asked = Counter(terms(question))
    if not asked or not hits:
        return []
    years = set(YEAR.findall(question))
    wants_figure, how_to = asks_figure(question), asks_how_to(question)
    candidates = []
    for number, hit in enumerate(hits[:EVIDENCE_CHUNKS], start=1):
        text = hit.chunk.text
        context_terms = set(terms(hit.chunk.context))
        introduced: set[str] = set()
        for unit in units(text):
            quote = text[unit.start:unit.end]
            own = set(terms(IDENTIFIER_PARTS.sub(" ", quote)))
            if unit.kind == "code":  # code right after "... use the params keyword:" is what that sentence names
                own |= introduced
            introduced = own if unit.kind == "sentence" and quote.endswith(":") else set()
            candidates.append((number, hit, unit, quote, own, own | set(terms(unit.header)) | context_terms))
    if not candidates:
        return []
    frequency = Counter(term for *_, own, _ in candidates for term in own)
    total = len(candidates)

    def weight(term: str) -> float:
        return math.log(1 + (total - frequency[term] + 0.5) / (frequency[term] + 0.5))

    scored = []
    for number, hit, unit, quote, own, seen in candidates:
        shared = [term for term in asked if term in seen]
        if sum(term in own for term in asked) < MIN_SHARED_TERMS:
            continue
        score = sum(weight(term) for term in shared) + sum(weight(term) for term in asked if term in own)
        if years:
            score += len(years & set(YEAR.findall(quote + " " + unit.header)))
        if wants_figure:
            score += 1.0 if FIGURE.search(quote) and any(ch.isdigit() for ch in quote) else -1.0
        if how_to and unit.kind == "code":
            score *= 2  # the code is the answer to "how do I": the sentence before it only introduces it
        score /= 1 + 0.25 * (number - 1)  # the ranking's order: the reranker read question and passage together
        scored.append((score, number, hit, unit, quote, set(shared)))
    scored.sort(key=lambda item: (-item[0], item[1], item[3].start))
    chosen: list[Evidence] = []
    covered: set[str] = set()
    for score, number, hit, unit, quote, shared in scored:
        if len(chosen) >= limit:
            break
        if chosen and shared <= covered and score < 0.5 * chosen[0].score:
            continue  # adds no term of the question and is much weaker than the best quote
        covered |= shared
        chunk = hit.chunk
        chosen.append(Evidence(number, chunk.id, chunk.doc_id, chunk.name or chunk.source, _page(chunk, unit),
                               unit.start, unit.end, quote, unit.kind, unit.header, round(score, 4)))
    return chosen


def _amount(cell: str) -> float | None:
    """A cell's figure: "$ (1,577)" → -1577.0; None for text."""
    match = AMOUNT.match(cell.strip())
    if not match or not any(ch.isdigit() for ch in match.group(2)):
        return None
    value = float(match.group(2).replace(",", ""))
    return -value if match.group(1) and match.group(3) else value


def computed_change(question: str, evidence: Evidence) -> str | None:
    """For a question about the change of a line between two periods it names ("from FY2015 to FY2016"), the change
    computed from the two figures of one quoted row, labelled as computed and with its inputs; None when the row does
    not hold both periods' figures."""
    if evidence.kind != "row" or not CHANGE.search(question):
        return None
    years = sorted(set(YEAR.findall(question)))
    if len(years) != 2:
        return None
    label, *values = evidence.cells
    columns = _column_names(evidence.header)
    by_year: dict[str, tuple[str, float]] = {}
    for position, cell in enumerate(values, start=1):
        name = columns[position] if position < len(columns) else ""
        found = [year for year in years if year in name]
        amount = _amount(cell)
        if len(found) == 1 and amount is not None and found[0] not in by_year:
            by_year[found[0]] = (cell, amount)
    if len(by_year) != 2:
        return None
    (old_text, old), (new_text, new) = by_year[years[0]], by_year[years[1]]
    change = new - old
    percent = f" ({change / abs(old) * 100:+.1f}%)" if old else ""
    return (f"Computed from the quoted row: {label} went from {old_text} ({years[0]}) to {new_text} ({years[1]}), "
            f"a change of {change:+,.2f}{percent}.")
