"""Evidence: quoted spans a reader can check — a table row under its caption and headers, a sentence, a code
block — with the page of the quoted words and offsets that reproduce the quote from its chunk."""

from rag.evidence import select_evidence, units
from rag.types import Chunk, ScoredChunk

TABLE = """Products and services gross margin and gross margin percentage were as follows (dollars in millions):
|  | Three Months Ended |  |
|  | June 30, 2024 | June 30, 2023 |
| --- | --- | --- |
| Products gross margin | 2,000 | 1,800 |
| Total gross margin percentage | 44.3 % | 43.1 % |"""
PROSE = ("Gross margin percentage increased compared to the same quarter a year ago. The increase was due to a "
         "favourable mix of products. Employees numbered 1,200 at the end of the quarter.")
HOWTO = """You can set a timeout on a client for every request it sends:

```python
client = httpx.Client(timeout=10.0)
```

Requests made without a client use the default."""


def hit(text: str, rank: int, page: int | None = None, page_end: int | None = None) -> ScoredChunk:
    chunk = Chunk("doc", rank, text, "/srv/files/q2.pdf", page=page, page_end=page_end, id=rank, name="q2.pdf",
                  context="Quarterly Report | Initech Inc.\nGross Margin | p. 19")
    return ScoredChunk(chunk, 1.0 / rank, rank, "hybrid")


def test_a_figure_question_is_answered_by_the_row_under_its_headers_on_the_rows_page():
    hits = [hit(PROSE, 1, page=21), hit(TABLE, 2, page=19, page_end=20)]
    evidence = select_evidence("What was the total gross margin percentage for the quarter ended June 30, 2024?", hits)
    best = evidence[0]
    assert best.kind == "row" and best.quote == "| Total gross margin percentage | 44.3 % | 43.1 % |"
    assert hits[1].chunk.text[best.start:best.end] == best.quote and best.number == 2
    assert best.page == 20 and best.source == "q2.pdf" and "/srv" not in best.source
    assert "(dollars in millions)" in best.header and "June 30, 2024" in best.header
    assert best.readable() == ("Total gross margin percentage: 44.3 % (Three Months Ended June 30, 2024); "
                               "43.1 % (June 30, 2023)")


def test_every_quote_is_its_chunks_text_at_its_offsets():
    for text in (TABLE, PROSE, HOWTO):
        for unit in units(text):
            assert text[unit.start:unit.end].strip() and text[unit.start:unit.end] == text[unit.start:unit.end].strip()


def test_a_how_to_question_gets_the_code_block():
    evidence = select_evidence("How do I set a timeout on a client?", [hit(HOWTO, 1)])
    kinds = {e.kind for e in evidence}
    assert "code" in kinds or any("timeout on a client" in e.quote for e in evidence)
    assert any("httpx.Client(timeout=10.0)" in e.quote for e in evidence)


def test_nothing_is_evidence_that_shares_no_word_with_the_question():
    assert select_evidence("Who founded the company in 1887?", [hit(TABLE, 1, page=19)]) == []


def test_a_change_between_two_named_periods_is_computed_from_one_row_and_labelled():
    from rag.evidence import Evidence, computed_change

    row = Evidence(1, 7, "doc", "adobe.pdf", 61, 0, 40, "| Operating income | 903,095 | $ (412,685) |", "row",
                   "CONSOLIDATED STATEMENTS OF INCOME (In thousands)\n|  | 2016 | 2015 |\n| --- | --- | --- |")
    line = computed_change("What is the change in operating income from FY2015 to FY2016?", row)
    assert line.startswith("Computed from the quoted row: Operating income went from $ (412,685) (2015) to "
                           "903,095 (2016)") and "+1,315,780.00" in line
    assert computed_change("What was operating income in FY2016?", row) is None  # no change asked
    assert computed_change("How did operating income change from FY2014 to FY2016?", row) is None  # 2014 not shown


def test_quotes_of_a_chunk_across_a_page_break_are_placed_on_the_page_they_stand_on(tmp_path):
    from dataclasses import replace

    from rag.pipeline import on_their_pages
    from tests.pdfs import table_overleaf

    path = tmp_path / "q2.pdf"
    path.write_bytes(table_overleaf())
    text = ("Products and services gross margin and gross margin percentage were as follows (dollars in millions):\n"
            "| Gross margin line 0 | 2,000 | 1,800 |")
    chunk = Chunk("doc", 0, text, str(path), page=1, page_end=2, id=1, name="q2.pdf")
    pool = [ScoredChunk(chunk, 1.0, 1, "hybrid")]
    sentence = select_evidence("What were the products and services gross margin?", pool)[0]
    assert sentence.kind == "sentence"
    row = replace(sentence, start=text.index("| Gross"), end=len(text), quote=text[text.index("| Gross"):],
                  kind="row", page=1)
    made_up = replace(sentence, quote="Nothing like this stands on either page.", page=1)
    placed = on_their_pages([sentence, row, made_up], pool)
    assert [(e.kind, e.page) for e in placed] == [("sentence", 1), ("row", 2)]  # the made-up quote is dropped


def test_code_without_fences_is_one_unit_and_answers_a_how_to_question():
    text = ("To include URL query parameters in the request, use the params keyword:\n\n"
            ">>> params = {'key1': 'value1'}\n>>> r = httpx.get('https://httpbin.org/get', params=params)\n\n"
            "The URL was encoded as you would expect.")
    code = [unit for unit in units(text) if unit.kind == "code"]
    assert [text[u.start:u.end] for u in code] == [
        ">>> params = {'key1': 'value1'}\n>>> r = httpx.get('https://httpbin.org/get', params=params)"]
    evidence = select_evidence("How do I pass query parameters in the URL?", [hit(text, 1)])
    assert any(e.kind == "code" and "params=params" in e.quote for e in evidence)
