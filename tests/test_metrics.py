"""Scoring: normalisation, <output> extraction, exact match and token F1 on hand-computed cases."""
import math

import pytest

from perk_fast.metrics import exact_match, extract_output, f1_score, normalize_answer, score


@pytest.mark.parametrize("raw, norm", [
    ("The Kitchen.", "kitchen"),
    ("  an  apple,  a pear ", "apple pear"),
    ("theatre", "theatre"),            # article only as a whole word
    ("the-end", "theend"),             # punctuation goes before articles
    ("School of Arts & Humanities", "school of arts humanities"),
    ("", ""),
])
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_extract_output_needs_both():
    assert extract_output("<output>Garden</output>", "<OUTPUT>garden</OUTPUT>") == ("garden", "garden")
    # only the first span counts; DOTALL lets it cross lines
    assert extract_output("<output>a\nb</output><output>c</output>", "<output> x </output>") == ("a\nb", "x")
    # one side without the tag: both stay whole
    assert extract_output("garden", "<output>Garden</output>") == ("garden", "<output>garden</output>")


def test_exact_match_cases():
    assert exact_match("The garden!", "garden") == 1.0
    assert exact_match("<support>Mary went to the office.</support>\n<output>the Office</output>",
                       "<support>x</support>\n<output>office</output>") == 1.0
    assert exact_match("garden", "<output>garden</output>") == 0.0  # no extraction from one side
    assert exact_match("kitchen", "garden") == 0.0


def test_f1_partial_overlap():
    # pred tokens [school, of, engineering], gold [school, of, arts]: P = R = 2/3
    assert f1_score("School of Engineering", "school of arts") == pytest.approx(2 / 3)
    # pred [red, red, apple] vs gold [red, apple, pie]: multiset overlap 2 -> P = R = 2/3
    assert f1_score("red red apple", "red apple pie") == pytest.approx(2 / 3)
    # pred [a1] vs gold [a1, b2, c3, d4]: P = 1, R = 1/4 -> F1 = 0.4
    assert f1_score("a1", "a1 b2 c3 d4") == pytest.approx(0.4)
    assert f1_score("the", "") == 1.0   # both empty after normalisation
    assert f1_score("x", "the") == 0.0
    assert f1_score("<output>new york</output>junk", "<output>york</output>") == pytest.approx(2 / 3)


def test_reference_f1_variant():
    # sets: {red, apple} overlap 2, P = 2/3 (3 pred tokens), R = 2/3
    assert f1_score("red red apple", "red apple pie", reference=True) == pytest.approx(2 / 3)
    # repeated overlap: pred [x, x], gold [x, x]: multiset F1 = 1, set F1: P = R = 1/2
    assert f1_score("x x", "x x") == 1.0
    assert f1_score("x x", "x x", reference=True) == pytest.approx(0.5)
    # whole strings, no extraction: tags become tokens "outputgardenoutput"
    assert f1_score("<output>garden</output>", "<output>garden</output> z", reference=True) == pytest.approx(2 / 3)


def test_score_means_as_fractions():
    out = score(["garden", "The office", "red apple"], ["garden", "kitchen", "red apple pie"])
    assert out["n"] == 3
    assert out["exact_match"] == pytest.approx(1 / 3)
    assert out["f1"] == pytest.approx((1.0 + 0.0 + 0.8) / 3)
    empty = score([], [])
    assert empty["n"] == 0 and math.isnan(empty["exact_match"]) and math.isnan(empty["f1"])
    with pytest.raises(ValueError, match="len\\(preds\\)=1"):
        score(["a"], ["a", "b"])
