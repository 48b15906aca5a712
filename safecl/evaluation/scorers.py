"""Task scorers and the bootstrap interval reported next to every rate.

exact_match_number(response, answer)
    The LAST number in the response equals the last number in the answer, numerically
    (|a - b| <= 1e-6 * max(1, |b|)). A number is digits with optional thousands commas in
    groups of three ("1,234" -> 1234; "1,2,3" is three numbers) and an optional decimal part;
    a leading "-" makes it negative only when the character before the "-" is not a letter or
    digit ("x = -5" -> -5, "3-5" -> 3 and 5). No number in the response scores 0.

label_accuracy(response, answer, labels)
    The label that occurs FIRST in the response (case-insensitive, longest label wins a tie
    at the same position) equals the answer (case-insensitive). A label occurs only as a
    whole word: the characters around it must not be letters, digits, "_" or "-", so
    "negative" does not occur in "non-negative" and "true" does not occur in "untrue".

bootstrap_ci(values, samples, seed)
    95% percentile bootstrap of the mean: draw ``samples`` resamples of size n with
    replacement (numpy Generator seeded with ``seed``), take the 2.5th and 97.5th
    percentiles of their means. Deterministic for a given seed.
"""

from __future__ import annotations

import math
import re

import numpy as np

_NUMBER = re.compile(r"(?:(?<![0-9A-Za-z])-)?(?:\d{1,3}(?:,\d{3})+(?![\d])|\d+)(?:\.\d+)?")


def numbers_in(text: str) -> list[float]:
    """Every number in ``text``, in order (see the module docstring for what a number is)."""
    return [float(m.group(0).replace(",", "")) for m in _NUMBER.finditer(text.replace("\u2212", "-"))]


def exact_match_number(response: str, answer: str | float | int) -> bool:
    """True iff the last number in ``response`` equals the answer's (last) number."""
    if isinstance(answer, (int, float)):
        gold = float(answer)
    else:
        found = numbers_in(str(answer))
        if not found:
            return False
        gold = found[-1]
    got = numbers_in(response)
    if not got:
        return False
    return math.isclose(got[-1], gold, rel_tol=1e-6, abs_tol=1e-6)


_FINAL = re.compile(r"(?:answer is|####)\s*\$?\s*-?[\d,]*\.?\d+(?:\.\d+)?\s*(?:[^\d.,\s]|\.\s|\n)", re.IGNORECASE)


def answer_decided(partial: str) -> bool:
    """Early stop for exact_match: the response has stated its final answer ("The answer is N."
    or "#### N") and moved past the number. The last number is then N unless the model writes
    another number after it, which a stop here cuts off: the stated answer is what is scored."""
    return _FINAL.search(partial) is not None


def _label_regex(labels: list[str]) -> re.Pattern:
    ordered = sorted({label.strip() for label in labels if label.strip()}, key=len, reverse=True)
    if not ordered:
        raise ValueError("label_accuracy needs at least one non-empty label")
    alternatives = "|".join(re.escape(label) for label in ordered)
    return re.compile(rf"(?<![\w-])(?:{alternatives})(?![\w-])", re.IGNORECASE)


def first_label(response: str, labels: list[str]) -> str | None:
    """The label occurring first in ``response`` (as written in ``labels``), or None."""
    match = _label_regex(labels).search(response)
    if match is None:
        return None
    found = match.group(0).lower()
    return next(label.strip() for label in labels if label.strip().lower() == found)


def label_decided(partial_response: str, labels: list[str]) -> bool:
    """True once a label occurs and a character follows it: later text cannot change the first label."""
    match = _label_regex(labels).search(partial_response)
    return match is not None and match.end() < len(partial_response)


def label_accuracy(response: str, answer: str, labels: list[str]) -> bool:
    """True iff the first label in ``response`` equals ``answer`` (case-insensitive)."""
    found = first_label(response, labels)
    return found is not None and found.lower() == str(answer).strip().lower()


def bootstrap_ci(values: list[float], samples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of ``values``.

    Raises:
        ValueError: ``values`` is empty or ``samples`` < 1.
    """
    if not values:
        raise ValueError("bootstrap_ci of an empty list")
    if samples < 1:
        raise ValueError(f"bootstrap samples must be >= 1, got {samples}")
    data = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), size=(samples, len(data)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)
