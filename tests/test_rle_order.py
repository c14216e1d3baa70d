"""RLE pixel order and index base, checked against the competitions' own spec examples."""

from __future__ import annotations

import numpy as np
import pytest

from ensemble_kit.errors import EkError
from ensemble_kit.inference.rle import decode, encode, parse_runs


def test_severstal_evaluation_example_column_major():
    # The Severstal evaluation page: "'1 3 10 5' implies pixels 1,2,3,10,11,12,13,14 are to be
    # included in the mask ... The pixels are numbered from top to bottom, then left to right:
    # 1 is pixel (1,1), 2 is pixel (2,1), etc." Pixel n of a 4 x 4 mask, 1-indexed, sits at
    # row (n - 1) % 4, column (n - 1) // 4.
    expected = np.zeros((4, 4), dtype=bool)
    for n in (1, 2, 3, 10, 11, 12, 13, 14):
        expected[(n - 1) % 4, (n - 1) // 4] = True
    assert expected[1, 0] and not expected[0, 1]  # "2 is pixel (2,1)": down, not right
    assert np.array_equal(decode("1 3 10 5", (4, 4)), expected)
    assert encode(expected, empty="") == "1 3 10 5"


def test_row_order_numbers_left_to_right_first():
    mask = np.zeros((2, 3), dtype=bool)
    mask[0, 1] = True  # row 0, column 1
    assert encode(mask) == "3 1"  # column-major: 1 + column * H + row
    assert encode(mask, order="row") == "2 1"  # row-major: 1 + row * W + column
    assert encode(mask, order="row", base=0) == "1 1"
    assert encode(mask, base=0) == "2 1"
    assert np.array_equal(decode("2 1", (2, 3), order="row"), mask)
    assert np.array_equal(decode("1 1", (2, 3), order="row", base=0), mask)
    assert np.array_equal(decode("2 1", (2, 3), base=0), mask)


@pytest.mark.parametrize("order", ["column", "row"])
@pytest.mark.parametrize("base", [0, 1])
def test_round_trip_every_order_and_base(order, base):
    rng = np.random.default_rng(3)
    for _ in range(20):
        mask = rng.random((7, 11)) < rng.uniform(0.05, 0.6)
        text = encode(mask, order=order, base=base)
        assert np.array_equal(decode(text, mask.shape, order=order, base=base), mask)


def test_empty_text_is_the_task_s():
    empty = np.zeros((3, 3), dtype=bool)
    assert encode(empty) == "-" and encode(empty, empty="") == ""
    assert not decode("", (3, 3)).any()


def test_base_zero_allows_pixel_zero_and_still_checks_the_end():
    starts, lengths = parse_runs("0 2", (2, 2), base=0)
    assert starts.tolist() == [1] and lengths.tolist() == [2]
    with pytest.raises(EkError, match="past the image end"):
        parse_runs("3 2", (2, 2), base=0)


def test_touching_runs_accepted_only_when_asked():
    with pytest.raises(EkError, match="touch"):
        parse_runs("1 2 3 1", (2, 2))
    starts, _ = parse_runs("1 2 3 1", (2, 2), allow_touching=True)
    assert starts.tolist() == [1, 3]
    with pytest.raises(EkError, match="overlap"):
        parse_runs("1 2 2 1", (2, 2), allow_touching=True)
