"""The packaged cross-encoder: it orders by answer rather than by shared words, matches its record, and is stable."""

import json

import numpy as np
import pytest

from rag.errors import UserError
from rag.rerank import PACKAGED_RERANKER, QUESTION_TOKENS, RECORD_FILE, Reranker

# Written for this test (no evaluation data): both passages share the question's words; only the first answers it.
QUESTION = "How much cash did the company generate from operating activities in fiscal 2021?"
ANSWER = ("Net cash provided by operating activities was $4.2 billion in fiscal 2021, compared with $3.1 billion in "
          "fiscal 2020, driven by higher net income and lower inventory.")
DISTRACTOR = ("The company's operating activities in fiscal 2021 included opening twelve new stores and moving its "
              "headquarters; the company expects these activities to continue in fiscal 2022.")


@pytest.fixture(scope="module")
def reranker():
    return Reranker()


def test_the_answering_passage_outranks_a_lexically_similar_one(reranker):
    answer, distractor = reranker.scores(QUESTION, [ANSWER, DISTRACTOR])
    assert answer > distractor
    assert reranker.scores(QUESTION, [DISTRACTOR, ANSWER]).argmax() == 1  # by content, not by position


def test_the_record_describes_the_shipped_file(reranker):
    record = json.loads((PACKAGED_RERANKER / RECORD_FILE).read_text())
    assert record["model_sha256"] == reranker.sha256()
    assert record["counts"]["train"] and record["graphs"]["int8"]["top1"] > 0
    assert (PACKAGED_RERANKER / "model.onnx").stat().st_size <= 25 * 1024 * 1024


def test_scores_are_deterministic_and_independent_of_the_batch(reranker):
    passages = [ANSWER, DISTRACTOR, "Revenue by segment is shown below. " * 40]
    first, again = reranker.scores(QUESTION, passages), reranker.scores(QUESTION, passages)
    np.testing.assert_array_equal(first, again)
    alone = np.array([reranker.scores(QUESTION, [passage])[0] for passage in passages])
    # Dynamic int8 quantisation scales activations per batch, so padding and neighbours move a logit a little;
    # 7-bit weights and 8-bit activations leave about 1/127 of the logits' range, a few hundredths here.
    tolerance = 0.05 * max(1.0, float(np.ptp(first)))
    np.testing.assert_allclose(alone, first, atol=tolerance)


def test_a_long_passage_is_cut_and_the_question_is_kept_whole(reranker):
    encoded = reranker.pairs.encode(QUESTION, ["word " * 2000])
    question_tokens = len(reranker.pairs.tokenizer.encode(QUESTION, add_special_tokens=False).ids)
    assert encoded["input_ids"].shape[1] == reranker.pairs.max_tokens
    assert int((encoded["token_type_ids"][0] == 0).sum()) == question_tokens + 2  # [CLS] question [SEP]
    long_question = "why " * (QUESTION_TOKENS * 3)
    assert reranker.pairs.encode(long_question, ["short passage"])["input_ids"].shape[1] <= reranker.pairs.max_tokens
    assert reranker.scores(QUESTION, []).shape == (0,)
    with pytest.raises(UserError):
        reranker.scores("  ", [ANSWER])
