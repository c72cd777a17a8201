"""What a document is, read from its metadata and first pages: title, issuer and period, for every chunk's context.

A passage from page 40 of a quarterly report says "the Company" and "three months ended"; the context line tells
the embedder and BM25 whose report and which quarter it is. The patterns are generic phrases documents use to state
these facts (cover pages of filings, reports, releases), never names of particular documents or companies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ingest.load import Element, LoadedDocument
from ingest.pdf import ORGANISATION, names_organisation
from rag.types import page_label

MONTH = r"(?:January|February|March|April|May|June|July|August|September|October|November|December|Jan\.?|Feb\.?|" \
        r"Mar\.?|Apr\.?|Jun\.?|Jul\.?|Aug\.?|Sept?\.?|Oct\.?|Nov\.?|Dec\.?)"
DATE = rf"{MONTH}\s+\d{{1,2}},?\s+\d{{4}}"
PERIOD_PATTERNS = [
    re.compile(rf"\b(?:for\s+the\s+)?((?:fiscal\s+)?(?:year|quarter|quarterly\s+period|period|fiscal\s+year|"
               rf"(?:three|six|nine|twelve)\s+months|(?:13|26|39|52|53)\s+weeks)\s+ended:?\s+{DATE})", re.I),
    re.compile(rf"\b(date\s+of\s+report)[^:]{{0,60}}:?\s*({DATE})", re.I),
    re.compile(r"\b((?:first|second|third|fourth)\s+quarter\s+(?:of\s+)?(?:fiscal\s+)?(?:19|20)\d\d)\b", re.I),
    re.compile(r"\b((?:fiscal|FY)\s*(?:19|20)\d\d)\b", re.I),
]
FIRST_DATE = re.compile(DATE)
REGISTRANT = re.compile(r"exact\s+name\s+of\s+(?:the\s+)?registrant", re.I)
FORM = re.compile(r"^form\s+[\w-]{1,10}$", re.I)
UNHELPFUL_METADATA = re.compile(r"^(untitled|anonymous|unknown|admin\w*|user|owner|microsoft\s+word\b.*|"
                                r"document\d*|.*\.(docx?|pdf|indd|qxd|rtf|xlsx?))$", re.I)
FIRST_PAGES = 2
CONTEXT_FIELD_CHARS = 80  # each field of the context line; it is embedded with every chunk, so kept short


@dataclass(frozen=True, slots=True)
class DocumentFacts:
    title: str
    issuer: str = ""
    period: str = ""

    @property
    def card(self) -> str:
        """What the document is, on one line: the same for all its chunks (`Chunk.document_card`)."""
        return " | ".join(dict.fromkeys(" ".join(part.split()) for part in (self.title, self.issuer, self.period)
                                        if part.strip()))

    def context(self, heading: str | None, page: int | None, statement: str = "") -> str:
        """Indexed before each chunk's text and embedded beside it: the document's card, then a line of where in it
        (section, the financial statement its table is, page)."""
        where = []
        if heading and heading not in (self.title, self.issuer, self.period):
            where.append(" ".join(heading[:CONTEXT_FIELD_CHARS].split()))
        if statement:
            where.append(statement)
        if page is not None:
            where.append(page_label(page))
        return f"{self.card}\n{' | '.join(where)}" if self.card else " | ".join(where)


def readable_name(source: str) -> str:
    """'ACME_2019_annual-report.pdf' → 'ACME 2019 annual report'; '' for names without words (ids, 'p03')."""
    name = " ".join(re.split(r"[_\-.\s]+", Path(source).stem)).strip()
    return name if re.search(r"[A-Za-z]{3,}", name) else ""


def _usable(value: str) -> bool:
    value = value.strip()
    return len(value) >= 4 and bool(re.search(r"[A-Za-z]{3,}", value)) and not UNHELPFUL_METADATA.match(value)


def _name_like(text: str) -> bool:
    """A line that can be a name: letters, no label or parenthetical (rules, 'Commission File Number: ...')."""
    return (len(text) <= 100 and bool(re.search(r"[A-Za-z]{3,}", text)) and not re.search(r"[:()]", text)
            and not re.search(r"\b(commission|file\s+n(o|umber)|date\s+of|transition|period|report|pursuant)\b",
                              text, re.I))


def _issuer(first: list[Element], author: str) -> str:
    """The registrant named above 'exact name of registrant', else a short first-pages line ending in a legal form
    (Inc., plc, ...), else a metadata author that is an organisation (press releases carry a person's name there)."""
    for index, element in enumerate(first):
        found = REGISTRANT.search(element.text)
        if found:
            before = element.text[:found.start()].rstrip(" (")
            if _name_like(before):  # the name and its caption on one line
                return before
            candidate = next((e.text for e in reversed(first[max(0, index - 4):index]) if _name_like(e.text)), "")
            if candidate:
                return candidate
    for element in first:
        text = element.text.strip()
        if names_organisation(text) and text[:1].isupper() and _name_like(text):
            return text
    return author if _usable(author) and ORGANISATION.search(author) and _name_like(author) else ""


def _period(first: list[Element]) -> str:
    text = " ".join(" ".join(element.text.split()) for element in first)
    for pattern in PERIOD_PATTERNS:
        match = pattern.search(text)
        if match:
            return " ".join(group for group in match.groups() if group)
    match = FIRST_DATE.search(text)
    return f"dated {match.group(0)}" if match else ""


def _squashed(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def describe(document: LoadedDocument, source: str) -> DocumentFacts:
    """Title (metadata, a form name or the first heading, and the file name), issuer and period."""
    elements = document.elements
    first_page = elements[0].page if elements else None
    first = [e for e in elements if e.page is None or first_page is None or e.page < first_page + FIRST_PAGES][:80]
    titles = []
    if _usable(document.metadata_title):
        titles.append(document.metadata_title[:CONTEXT_FIELD_CHARS])
    form = next((e.text for e in first if FORM.match(e.text.strip())), "")
    if form and _squashed(form.split(None, 1)[1]) not in _squashed(" ".join(titles)):
        titles.append(form)
    elif not titles:
        heading = next((e.text for e in first if e.category == "Title" and len(e.text) <= CONTEXT_FIELD_CHARS), "")
        titles.append(heading)
    titles.append(readable_name(source))
    title = " | ".join(dict.fromkeys(t for t in titles if t))
    return DocumentFacts(title, _issuer(first, document.metadata_author), _period(first))
