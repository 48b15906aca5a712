"""Task scorers (exact match on numbers, label accuracy) and the bootstrap interval."""

import pytest

from safecl.evaluation.scorers import (
    bootstrap_ci,
    exact_match_number,
    first_label,
    label_accuracy,
    label_decided,
    numbers_in,
)


@pytest.mark.parametrize(
    "response, answer, expected",
    [
        ("The answer is 42.", "42", True),
        ("The answer is 42.", "41", False),
        ("First 10, then 20.", "10", False),  # the LAST number counts
        ("Total: 1,234 apples", "1234", True),
        ("Total: 1,234 apples", "1,234", True),
        ("It is 1,234,567 in all", "1234567", True),
        ("Choose from 1,2,3", "3", True),  # not thousands groups: three numbers
        ("It is -5 degrees", "-5", True),
        ("It is -5 degrees", "5", False),
        ("The range 3-5 holds it: 5", "5", True),
        ("Subtract: 10-5", "5", True),  # a hyphen after a digit is not a minus sign
        ("So the price is $3.50", "3.5", True),
        ("No number here", "7", False),
        ("72", "Natalia sold 48 + 24 = 72 clips.\n#### 72", True),  # GSM8K-style answer
        ("42", 42, True),
        ("x = \u22123", "-3", True),  # unicode minus
    ],
)
def test_exact_match_number(response, answer, expected):
    assert exact_match_number(response, answer) is expected


def test_answer_without_number_never_matches():
    assert not exact_match_number("12", "twelve")


def test_numbers_in_order():
    assert numbers_in("a 1,000 b -2.5 c 3") == [1000.0, -2.5, 3.0]


LABELS = ["positive", "negative"]


@pytest.mark.parametrize(
    "response, answer, expected",
    [
        ("Negative.", "negative", True),
        ("negative", "Negative", True),  # answer case-insensitive
        ("The sentiment is positive, not negative.", "positive", True),  # first occurrence wins
        ("The sentiment is positive, not negative.", "negative", False),
        ("A non-negative review, so: positive", "positive", True),  # "non-negative" is not the label
        ("This is non-negative", "negative", False),
        ("positively glowing", "positive", False),  # whole words only
        ("", "positive", False),
    ],
)
def test_label_accuracy(response, answer, expected):
    assert label_accuracy(response, answer, LABELS) is expected


def test_first_label_prefers_the_longest_label_at_a_position():
    assert first_label("positive vibes", ["pos", "positive"]) == "positive"
    assert first_label("POS tag", ["pos", "positive"]) == "pos"
    assert first_label("nothing", LABELS) is None


def test_label_decided_needs_a_character_after_the_label():
    assert not label_decided("The answer is neg", LABELS)
    assert not label_decided("The answer is negative", LABELS)  # could still become "negatively"
    assert label_decided("The answer is negative.", LABELS)


def test_bootstrap_ci_is_deterministic_and_brackets_the_mean():
    values = [1.0] * 7 + [0.0] * 13
    lo, hi = bootstrap_ci(values, samples=500, seed=3)
    assert (lo, hi) == bootstrap_ci(values, samples=500, seed=3)
    assert 0.0 <= lo <= 7 / 20 <= hi <= 1.0 and lo < hi


def test_bootstrap_ci_edges():
    assert bootstrap_ci([1.0, 1.0, 1.0], samples=50, seed=0) == (1.0, 1.0)
    assert bootstrap_ci([0.0], samples=50, seed=0) == (0.0, 0.0)
    with pytest.raises(ValueError):
        bootstrap_ci([], samples=10, seed=0)


def test_answer_decided_stops_only_after_the_stated_answer():
    from safecl.evaluation.scorers import answer_decided, exact_match_number

    assert not answer_decided("First 3 + 4 = 7, then")
    assert not answer_decided("The answer is 42")  # the number may still grow
    assert not answer_decided("The answer is 1,2")
    assert answer_decided("3 + 4 = 7. The answer is 7.\n")
    assert answer_decided("#### 1,200\n") and answer_decided("The answer is $12. More text")
    cut = "So she pays 5 * 3 = 15 dollars. The answer is 15. "
    assert answer_decided(cut) and exact_match_number(cut, "15")
