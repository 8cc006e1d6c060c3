"""Yes/no parsing and the judge question."""

import pytest

from relvid.eval.judge import QUESTION_TEMPLATE, judge_question, parse_yes_no


@pytest.mark.parametrize("text,expected", [
    ("Yes", True), ("yes.", True), ("No", False), ("NO!", False), ('"yes"', True), ("**Yes**", True),
    ("Answer: no", False), ("The answer is yes.", True), ("Yes, the two subjects are shaking hands; no doubt", True),
    ("they do not", None), ("yes or no", None), ("", None), ("Nope", None), ("Yesterday", None),
    ("The subjects are hugging, so: no.", False),
])
def test_parse_yes_no(text, expected):
    assert parse_yes_no(text) is expected


def test_question_uses_the_judge_phrase():
    q = judge_question("handshake")
    assert q == QUESTION_TEMPLATE.format("handshaking")
    assert q.startswith("Based on the keyframes of the video") and q.endswith("The answer should be 'yes' or 'no'.")
