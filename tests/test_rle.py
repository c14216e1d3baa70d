"""Run-length encoding: golden cases, round trips against the per-pixel reference, rejects."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ensemble_kit.errors import EkError
from ensemble_kit.inference.rle import (
    _runs_dense,
    _runs_sparse,
    decode,
    decode_reference,
    encode,
    encode_batch,
    encode_reference,
    parse_runs,
)

SHAPE = (256, 256)


def mask_with(*pixels: tuple[int, int], shape=SHAPE) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    for r, c in pixels:
        mask[r, c] = True
    return mask


# --- golden cases -------------------------------------------------------------------


def test_spec_example_rows_0_to_2_of_column_0():
    mask = mask_with((0, 0), (1, 0), (2, 0))
    assert encode(mask) == "1 3"
    np.testing.assert_array_equal(decode("1 3", SHAPE), mask)


@pytest.mark.parametrize("r, c", [(0, 0), (1, 0), (255, 0), (0, 1), (5, 3), (3, 5), (255, 255)])
def test_pixel_number_is_column_major_one_indexed(r, c):
    number = c * 256 + r + 1
    assert encode(mask_with((r, c))) == f"{number} 1"
    decoded = decode(f"{number} 1", SHAPE)
    assert decoded[r, c] and decoded.sum() == 1


def test_non_square_pixel_number_uses_height():
    # (H, W) = (3, 5): pixel (r, c) is c * 3 + r + 1, so (2, 1) is 6 and (0, 4) is 13.
    assert encode(mask_with((2, 1), (0, 4), shape=(3, 5))) == "6 1 13 1"
    assert np.argwhere(decode("6 1 13 1", (3, 5))).tolist() == [[0, 4], [2, 1]]


def test_run_across_column_boundary_is_one_run():
    mask = mask_with((254, 0), (255, 0), (0, 1), (1, 1))
    assert encode(mask) == "255 4"
    np.testing.assert_array_equal(decode("255 4", SHAPE), mask)


def test_row_neighbours_are_separate_runs():
    # Horizontal neighbours are 256 pixels apart in column-major order.
    assert encode(mask_with((7, 0), (7, 1))) == "8 1 264 1"


def test_empty_mask_is_dash():
    assert encode(np.zeros(SHAPE, dtype=bool)) == "-"
    assert encode(np.zeros(SHAPE, dtype=np.uint8)) == "-"


@pytest.mark.parametrize("text", ["-", "", "   ", " - \n"])
def test_empty_texts_decode_to_empty_mask(text):
    decoded = decode(text, SHAPE)
    assert decoded.shape == SHAPE and decoded.dtype == bool and not decoded.any()


def test_full_mask_is_one_run():
    assert encode(np.ones(SHAPE, dtype=bool)) == "1 65536"
    assert decode("1 65536", SHAPE).all()


def test_last_pixel_and_first_pixel():
    assert encode(mask_with((0, 0), (255, 255))) == "1 1 65536 1"


def test_accepts_0_1_integers_and_extra_whitespace():
    mask = mask_with((0, 0), (1, 0), (10, 2)).astype(np.int64)
    assert encode(mask) == "1 2 523 1"
    np.testing.assert_array_equal(decode("  1\t2\n 523   1 ", SHAPE), mask.astype(bool))


def test_decode_returns_c_contiguous_bool():
    decoded = decode("6 1", (3, 5))
    assert decoded.dtype == bool and decoded.flags.c_contiguous


def test_encode_rejects_non_binary_and_wrong_rank():
    with pytest.raises(ValueError, match="threshold"):
        encode(np.full((4, 4), 0.5))
    with pytest.raises(ValueError, match="2-D"):
        encode(np.zeros((2, 4, 4), dtype=bool))
    with pytest.raises(ValueError, match="3-D"):
        encode_batch(np.zeros((4, 4), dtype=bool))


def test_parse_runs_returns_starts_and_lengths():
    starts, lengths = parse_runs("3 2 10 4", (4, 4))
    assert starts.tolist() == [3, 10] and lengths.tolist() == [2, 4]


# --- malformed input ----------------------------------------------------------------


@pytest.mark.parametrize(
    "text, message",
    [
        ("1 3 7", "odd number"),
        ("1", "odd number"),
        ("1 x", "'x' is not a positive integer"),
        ("1.0 3", "'1.0' is not a positive integer"),
        ("1 -3", "'-3' is not a positive integer"),
        ("-1 3", "'-1' is not a positive integer"),
        ("+1 3", "'\\+1' is not a positive integer"),
        ("1,3 5", "'1,3' is not a positive integer"),
        ("- 1 3 1", "'-' is not a positive integer"),
        ("١ 3", "not a positive integer"),  # Arabic-Indic digit one
        ("1\x1c3", "not a positive integer"),  # str.split() whitespace, not numpy's
        ("1\xa03 4 5", "not a positive integer"),  # no-break space
        ("1 2\x00", "not a positive integer"),
        ("0 3", "pair 1 has start 0"),
        ("5 0", "pair 1 has length 0"),
        ("1 2 5 0", "pair 2 has length 0"),
        ("10 2 4 1", "pairs 1 and 2 .*not ascending"),
        ("4 1 4 1", "not ascending"),
        ("1 5 3 1", "overlap"),
        ("1 2 3 1", "touch"),
        ("1 1 9 3 12 1", "pairs 2 and 3 .*touch"),
        ("16 2", "past the image end"),
        ("17 1", "past the image end"),
        (
            "99999999999999999999999 1",
            "start 99999999999999999999999, past the image end .16 pixels",
        ),
    ],
)
def test_decode_rejects_malformed(text, message):
    with pytest.raises(EkError, match=message):
        decode(text, (4, 4))


def test_decode_accepts_run_ending_on_last_pixel():
    assert decode("15 2", (4, 4))[3, 3]


def test_decode_rejects_non_string():
    with pytest.raises(EkError, match="must be a string"):
        decode(float("nan"), SHAPE)


def test_error_messages_are_one_line():
    for text in ["1 3 7", "1 x", "0 3", "4 1 2 1", "1 2 3 1", "16 2"]:
        with pytest.raises(EkError) as caught:
            decode(text, (4, 4))
        assert "\n" not in str(caught.value)


# --- properties against the per-pixel reference --------------------------------------

shapes = st.tuples(st.integers(1, 40), st.integers(1, 40))


@st.composite
def masks(draw):
    shape = draw(shapes)
    density = draw(st.sampled_from([0.0, 0.05, 0.3, 0.7, 1.0]))
    seed = draw(st.integers(0, 2**32 - 1))
    return np.random.default_rng(seed).random(shape) < density


@given(masks())
@settings(max_examples=300, deadline=None)
def test_round_trip_and_reference_agree(mask):
    text = encode(mask)
    assert text == encode_reference(mask)
    decoded = decode(text, mask.shape)
    np.testing.assert_array_equal(decoded, mask)
    np.testing.assert_array_equal(decode_reference(text, mask.shape), mask)


@given(arrays(np.bool_, shapes))
@settings(max_examples=200, deadline=None)
def test_round_trip_arbitrary_bool_arrays(mask):
    np.testing.assert_array_equal(decode(encode(mask), mask.shape), mask)


@given(shapes, st.data())
@settings(max_examples=200, deadline=None)
def test_valid_run_lists_decode_like_reference_and_re_encode(shape, data):
    # Build a valid RLE directly from gaps and lengths, so decode is tested on texts
    # that encode did not produce.
    pixels = shape[0] * shape[1]
    numbers, position = [], 1
    while position <= pixels and data.draw(st.booleans()):
        start = position + data.draw(st.integers(0, 5))
        if start > pixels:
            break
        length = data.draw(st.integers(1, pixels - start + 1))
        numbers += [start, length]
        position = start + length + 1  # leave a gap: runs must not touch
    text = " ".join(map(str, numbers)) or "-"
    decoded = decode(text, shape)
    np.testing.assert_array_equal(decoded, decode_reference(text, shape))
    assert encode(decoded) == text


@given(st.integers(0, 6), shapes, st.integers(0, 2**32 - 1))
@settings(max_examples=100, deadline=None)
def test_encode_batch_matches_encode(batch, shape, seed):
    rng = np.random.default_rng(seed)
    stack = rng.random((batch, *shape)) < rng.choice([0.0, 0.1, 0.5, 1.0], size=(batch, 1, 1))
    assert encode_batch(stack) == [encode(m) for m in stack]
    assert encode_batch(stack.astype(np.uint8)) == [encode_reference(m) for m in stack]


def test_encode_batch_runs_do_not_join_across_masks():
    stack = np.zeros((2, 4, 4), dtype=bool)
    stack[0, 3, 3] = stack[1, 0, 0] = True  # last pixel of mask 0, first of mask 1
    assert encode_batch(stack) == ["16 1", "1 1"]


@given(masks())
@settings(max_examples=200, deadline=None)
def test_dense_and_sparse_run_finders_agree(mask):
    # encode picks one by density; both must find the same runs at any density.
    assume(mask.any())  # encode returns "-" before choosing
    dense, sparse = _runs_dense(mask), _runs_sparse(mask)
    np.testing.assert_array_equal(dense[0], sparse[0])
    np.testing.assert_array_equal(dense[1], sparse[1])


@pytest.mark.parametrize("density", [0.01, 0.5])
def test_non_contiguous_and_fortran_inputs(density):
    mask = np.random.default_rng(1).random((40, 30)) < density
    expected = encode_reference(mask)
    assert encode(np.asfortranarray(mask)) == expected
    assert encode(np.ascontiguousarray(np.stack([mask, ~mask], axis=-1))[:, :, 0]) == expected
    assert encode(mask.T.copy().T) == expected
