"""Financial statements, named the way readers ask for them: "the cash flow statement", "balance sheet".

Filings caption the same statement many ways ("CONSOLIDATED STATEMENTS OF OPERATIONS", "Statements of Earnings",
"Consolidated Income Statements"); a question says "income statement". Ingestion names the statement a table is
(from its caption, else from its row labels) in the chunk's context line, and retrieval reads which statements a
question names, so both meet on one name. The patterns are the accounting vocabulary of statements and their
standard line items (US GAAP and IFRS wording), never a particular company's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Statement:
    name: str  # as the chunk's context line writes it, and as questions mostly say it
    caption: re.Pattern  # a table's caption or heading naming it
    rows: re.Pattern  # row labels only this statement carries
    question: re.Pattern  # a question asking for it (its name, or a line item read from it)


def _words(pattern: str) -> re.Pattern:
    return re.compile(rf"\b(?:{pattern})\b", re.I)


STATEMENTS = (
    Statement("balance sheet",
              _words(r"balance\s+sheets?|statements?\s+of\s+(?:consolidated\s+)?financial\s+(?:position|condition)"),
              _words(r"total\s+current\s+assets|total\s+assets|total\s+current\s+liabilities|total\s+liabilities"
                     r"(?:\s+and\s+(?:stockholders|shareholders)['’]?\s+equity)?|accounts\s+payable|inventor(?:y|ies)"),
              _words(r"balance\s+sheets?|financial\s+position|total\s+(?:current\s+)?(?:assets|liabilities)|"
                     r"working\s+capital|accounts\s+(?:payable|receivable)|inventor(?:y|ies)|quick\s+ratio|"
                     r"current\s+ratio")),
    Statement("income statement",
              _words(r"income\s+statements?|statements?\s+of\s+(?:consolidated\s+)?(?:operations|income|earnings|"
                     r"comprehensive\s+(?:income|loss)|profit\s+(?:or|and)\s+loss)|profit\s+and\s+loss"),
              _words(r"cost\s+of\s+(?:sales|revenues?|goods\s+sold)|gross\s+(?:profit|margin)|operating\s+income|"
                     r"income\s+from\s+operations|(?:basic|diluted)\s+(?:net\s+)?(?:income|earnings)\s+per\s+share"),
              _words(r"income\s+statements?|statements?\s+of\s+(?:operations|income|earnings)|p\s*&\s*l|"
                     r"gross\s+(?:profit|margin)|operating\s+(?:income|margin)|cost\s+of\s+(?:sales|goods\s+sold)|"
                     r"revenues?|net\s+(?:income|earnings)|ebitda|earnings\s+per\s+share|eps")),
    Statement("cash flow statement",
              _words(r"(?:statements?\s+of\s+(?:consolidated\s+)?cash\s+flows?)|cash\s+flows?\s+statements?"),
              _words(r"net\s+cash\s+(?:provided|used|from)|(?:operating|investing|financing)\s+activities"),
              _words(r"cash\s+flows?|operating\s+activities|investing\s+activities|financing\s+activities|"
                     r"capital\s+expenditures?|capex|purchases?\s+of\s+property|free\s+cash|dividends\s+paid|"
                     r"depreciation")),
    Statement("statement of equity",
              _words(r"statements?\s+of\s+(?:changes\s+in\s+)?(?:consolidated\s+)?(?:stockholders|shareholders|"
                     r"owners)['’]?\s+equity|statements?\s+of\s+(?:changes\s+in\s+)?equity"),
              _words(r"balances?\s+(?:at|as\s+of)\s+\w+|treasury\s+stock\s+acquired|additional\s+paid-in\s+capital"),
              _words(r"(?:stockholders|shareholders)['’]?\s+equity\s+statement|statement\s+of\s+(?:changes\s+in\s+)?"
                     r"(?:stockholders['’]?\s+|shareholders['’]?\s+)?equity")),
    Statement("segment information",
              _words(r"segment\s+(?:information|results|data|reporting|operating\s+results)|reportable\s+segments?|"
                     r"(?:information|results)\s+by\s+(?:business\s+)?segment"),
              _words(r"total\s+segment|segment\s+(?:operating\s+)?(?:income|profit|revenues?)"),
              _words(r"segments?")),
)
MIN_ROW_LABELS = 2  # distinct labels a table's rows must share with a statement to be named by them alone


def statement_of(caption: str, table_text: str = "") -> str:
    """The statement a table is: named by its caption or heading, else by two or more of its row labels that only
    that statement carries; '' for anything else."""
    for statement in STATEMENTS:
        if statement.caption.search(caption):
            return statement.name
    if not table_text:
        return ""
    best, found = "", 0
    for statement in STATEMENTS:
        labels = {match.group(0).lower() for match in statement.rows.finditer(table_text)}
        if len(labels) >= MIN_ROW_LABELS and len(labels) > found:
            best, found = statement.name, len(labels)
    return best


def statements_asked(question: str) -> set[str]:
    """The statements a question names or asks a line item of ("capital expenditure" is read off cash flows)."""
    return {statement.name for statement in STATEMENTS if statement.question.search(question)}
