"""Follow-up questions: a conversation's latest question made standalone before retrieval.

"And for async clients?" retrieves nothing useful on its own. Two ways to make it standalone are offered and
measured by `bench/followups.py`:

- `rule` (default): a question that leans on the conversation (it has a pronoun or a demonstrative that points
  back, opens with "and", "what about", "how about", or has at most `SHORT_QUESTION_WORDS` words) is searched
  together with the previous standalone question: "How do I set a timeout? And for async clients?". Retrieval
  then sees both the topic and the new ask; the decoder is still asked the question as the user wrote it, with the
  earlier turns in its prompt.
- `decoder`: the decoder rewrites it ("Rewrite the last question so that it can be understood on its own").

    >>> standalone_question([Turn("How do I set a timeout on a client?", "timeout=5.0 [1]")], "And for async ones?")
    'How do I set a timeout on a client? And for async ones?'
    >>> standalone_question([Turn("How do I set a timeout?", "timeout=5.0 [1]")], "What is HTTP/2?")
    'What is HTTP/2?'
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from rag.types import Choice

# Words that make a question lean on what came before. "that"/"this" only count as determiners or pronouns at the
# end ("Why is that?") or before a noun-less verb; matching them anywhere would catch relative clauses ("the
# client that ..."), so they are left to the opening-phrase and short-question rules.
REFERRING_WORDS = frozenset(
    "it its it's they them their theirs he him his she her hers these those there such".split()
)
FOLLOW_UP_OPENINGS = ("and ", "what about ", "how about ", "and what about ", "also ", "then ", "so ")
SHORT_QUESTION_WORDS = 2
_WORD = re.compile(r"[a-z']+")

REWRITE_SYSTEM = ("Rewrite the user's last question so that it can be understood without the conversation. "
                  "Reply with the rewritten question only.")


class RewriteMode(Choice, label="rewrite mode"):
    RULE = "rule"  # previous standalone question + the follow-up, for retrieval (see module docstring)
    DECODER = "decoder"  # the decoder rewrites the follow-up
    NONE = "none"  # the question is searched as asked


@dataclass(frozen=True, slots=True)
class Turn:
    """One exchange of a conversation; `standalone` is the question as it was searched (None: as asked)."""

    question: str
    answer: str
    standalone: str | None = None
    citations: list = field(default_factory=list)

    @property
    def searched(self) -> str:
        return self.standalone or self.question


def is_follow_up(question: str) -> bool:
    """Whether the question leans on an earlier turn (see REFERRING_WORDS and FOLLOW_UP_OPENINGS)."""
    lowered = question.strip().lower()
    words = _WORD.findall(lowered)
    return (len(words) <= SHORT_QUESTION_WORDS or lowered.startswith(FOLLOW_UP_OPENINGS)
            or any(word in REFERRING_WORDS for word in words))


def standalone_question(history: Sequence[Turn], question: str) -> str:
    """The rule rewrite: the previous standalone question joined to a follow-up; other questions unchanged."""
    if not history or not is_follow_up(question):
        return question
    return f"{history[-1].searched.strip()} {question.strip()}"


def rewrite_messages(history: Sequence[Turn], question: str) -> list[dict[str, str]]:
    """Chat messages asking the decoder for a standalone version of `question`."""
    lines = [f"User: {turn.question}\nAssistant: {turn.answer}" for turn in history]
    conversation = "\n".join(lines + [f"User: {question}"])
    return [{"role": "system", "content": REWRITE_SYSTEM}, {"role": "user", "content": conversation}]
