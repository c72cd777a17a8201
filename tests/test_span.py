"""Span alignment of a small model's answer to its sources, and the SQuAD v1.1 answer metrics."""

from __future__ import annotations

import random
import time

import pytest

from rag.metrics import best_exact_match, best_f1, exact_match, normalize_answer, token_f1
from rag.span import MAX_SPAN_WORDS, align_to_source, answer_keywords

SUPER_BOWL = ("Super Bowl 50 was an American football game to determine the champion of the National Football League "
              "(NFL) for the 2015 season. The American Football Conference (AFC) champion Denver Broncos defeated the "
              "National Football Conference (NFC) champion Carolina Panthers 24–10 to earn their third Super Bowl "
              "title. The game was played on February 7, 2016, at Levi's Stadium in Santa Clara, California.")


def check_exact(match, sources):
    assert sources[match.source_index][match.start_char:match.end_char] == match.text


@pytest.mark.parametrize("answer, question, expected", [
    # rambling: the key words buried in a longer reply
    ("The Super Bowl 50 was won by the team called the Denver Broncos, who were very good that year.",
     "Which NFL team won Super Bowl 50?", "Denver Broncos"),
    # the reply echoes the question before answering
    ("The game was played at Levi's Stadium in Santa Clara.", "Where was the game played?",
     "Levi's Stadium in Santa Clara"),
    ("Super Bowl 50 was played on February 7, 2016", "When was Super Bowl 50 played?", "February 7, 2016"),
    ("Carolina Panthers [1]", "Who lost?", "Carolina Panthers"),
])
def test_aligns_to_the_intended_span(answer, question, expected):
    match = align_to_source(answer, question, [SUPER_BOWL])
    assert match is not None and match.text == expected
    check_exact(match, [SUPER_BOWL])
    assert 0 < match.score <= 1


def test_question_echo_is_ignored():
    assert answer_keywords("The Super Bowl 50 champion was Denver", "Who was the Super Bowl 50 champion?") == ["denver"]
    # only question words: fall back to the answer's own content words instead of giving up
    assert answer_keywords("Paris", "Is it Paris or Lyon?") == ["paris"]
    assert answer_keywords("the", "Why?") == []


def test_picks_the_source_that_holds_the_answer_and_reports_offsets():
    sources = ["The river Thames flows through London.", SUPER_BOWL, "Broncos are wild horses of the American West."]
    match = align_to_source("They said the Denver Broncos defeated Carolina.", "Who won?", sources)
    assert match.source_index == 1
    assert match.text == "Denver Broncos defeated"
    # unweighted: 3 of the 5 informative words in 3 span words (F1 0.75) beats reaching on to 'Carolina' (4 in 9)
    plain = align_to_source("They said the Denver Broncos defeated Carolina.", "Who won?", sources, position_decay=1)
    assert plain.text == "Denver Broncos defeated" and plain.score == pytest.approx(0.75)


def test_words_named_first_weigh_more():
    source = "Louis XIV signed the treaty in 1685. The Edict of Fontainebleau council decree came later."
    answer = "Louis XIV, not the Edict of Fontainebleau council decree"
    # plain F1 prefers the span covering more words; the model named Louis XIV first
    assert align_to_source(answer, "Who signed the treaty?", [source], position_decay=1).text == (
        "Edict of Fontainebleau council decree")
    assert align_to_source(answer, "Who signed the treaty?", [source]).text == "Louis XIV"


def test_ties_prefer_shorter_then_earlier_source():
    sources = ["alpha beta gamma", "alpha beta"]
    match = align_to_source("alpha", "?", sources)
    assert (match.text, match.source_index, match.start_char) == ("alpha", 0, 0)
    # 'beta' then 'alpha' match better as a two-word span in the second source
    match = align_to_source("beta alpha", "?", ["beta x alpha", "beta alpha"])
    assert (match.text, match.source_index, match.score) == ("beta alpha", 1, 1.0)


def test_span_length_is_bounded():
    source = " ".join(f"w{i}" for i in range(40))
    match = align_to_source(source, "?", [source])
    assert len(match.text.split()) == MAX_SPAN_WORDS
    assert len(align_to_source(source, "?", [source], max_words=3).text.split()) == 3


def test_edge_punctuation_is_trimmed_but_abbreviations_kept():
    sources = ["He moved to the U.S. in 1990, then (briefly) to Canada."]
    assert align_to_source("U.S.", "Where?", sources).text == "U.S."
    assert align_to_source("in 1990", "When?", sources).text == "1990"
    assert align_to_source("briefly", "How long?", sources).text == "briefly"
    assert align_to_source("Canada", "Where?", sources).text == "Canada"


def test_no_overlap_or_empty_answer_gives_none():
    assert align_to_source("Quantum chromodynamics", "What?", [SUPER_BOWL]) is None
    assert align_to_source("", "What?", [SUPER_BOWL]) is None
    assert align_to_source("Denver", "Who?", []) is None


def test_alignment_is_fast():
    rng = random.Random(0)
    vocab = [f"word{i}" for i in range(300)]
    sources = [" ".join(rng.choice(vocab) for _ in range(400)) for _ in range(5)]
    answer = " ".join(rng.choice(vocab) for _ in range(40))
    started = time.perf_counter()
    for _ in range(10):
        align_to_source(answer, "a question", sources)
    assert (time.perf_counter() - started) / 10 < 0.05


@pytest.mark.parametrize("text, expected", [
    ("The  Cat!", "cat"),
    ("  An apple, a day. ", "apple day"),
    ("Theater", "theater"),  # articles only as whole words
    ("U.S.-based", "usbased"),  # punctuation is removed, not replaced by a space
    ("Denver\tBroncos\n", "denver broncos"),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_token_f1_and_exact_match():
    assert token_f1("Denver Broncos", "the Denver Broncos") == 1.0
    assert exact_match("the Denver Broncos!", "Denver Broncos") == 1.0
    assert exact_match("Broncos", "Denver Broncos") == 0.0
    # precision 1/1, recall 1/2 -> 2/3
    assert token_f1("Broncos", "Denver Broncos") == pytest.approx(2 / 3)
    # 'it was the broncos' -> [it, was, broncos]: precision 1/3, recall 1/2 -> 0.4
    assert token_f1("It was the Broncos", "Denver Broncos") == pytest.approx(0.4)
    # repeated tokens are counted as a multiset: common = 1
    assert token_f1("broncos broncos", "broncos") == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert token_f1("", "Denver") == 0.0 and token_f1("the", "a") == 0.0  # v1.1: empty side scores 0
    assert best_f1("Broncos", ["Carolina", "Denver Broncos", "Broncos"]) == 1.0
    assert best_exact_match("Denver", ["Carolina", "denver."]) == 1.0
    assert best_f1("x", []) == 0.0


def test_an_answer_that_already_quotes_a_source_is_kept_whole():
    sources = ["The French built Fort Duquesne in 1754 where the rivers meet."]
    # Aligning would drop "Fort", which the question also says; the answer is already the source's phrase.
    match = align_to_source("fort Duquesne [1]", "Which fort did the French build?", sources)
    assert (match.text, match.start_char, match.score) == ("Fort Duquesne", 17, 1.0)
    assert align_to_source("in 1754.", "When?", sources).text == "1754"  # edge function words still go
    assert align_to_source("Fort Duq", "Which fort?", sources) is None  # whole words only: "duq" is no source word
