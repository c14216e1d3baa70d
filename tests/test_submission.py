"""Writing and checking submission CSVs, on tmp files and on the real Kaggle sample."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ensemble_kit.errors import EkError
from ensemble_kit.inference.rle import decode, encode
from ensemble_kit.inference.submission import HEADER, check_submission, write_submission

SAMPLE_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "contrails-sample"

# Realistic ids: 18-19 digits, beyond float precision, one with a leading zero.
IDS = ["1002653297254493116", "100071707854144929", "0123456789012345678"]
RLES = ["-", "1 3 300 2", "65535 2"]


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def make_data_root(root: Path, ids: list[str], sample_ids: list[str] | None = None) -> Path:
    for record_id in ids:
        (root / "test" / record_id).mkdir(parents=True)
    if sample_ids is not None:
        rows = "".join(f"{r},-\n" for r in sample_ids)
        (root / "sample_submission.csv").write_text(f"{HEADER}\n{rows}")
    return root


@pytest.fixture
def good_csv(tmp_path: Path) -> Path:
    path = tmp_path / "submission.csv"
    write_submission(path, IDS, RLES)
    return path


# --- write_submission ---------------------------------------------------------------


def test_write_keeps_ids_exactly_and_reads_back(good_csv: Path):
    assert good_csv.read_text().splitlines() == [HEADER] + [f"{i},{r}" for i, r in zip(IDS, RLES)]
    frame = pd.read_csv(good_csv, dtype=str, keep_default_na=False)
    assert frame["record_id"].tolist() == IDS
    assert frame["encoded_pixels"].tolist() == RLES


def test_write_is_atomic_and_leaves_no_temp_files(good_csv: Path):
    assert [p.name for p in good_csv.parent.iterdir()] == [good_csv.name]


def test_write_failure_keeps_previous_file(good_csv: Path):
    before = good_csv.read_text()
    with pytest.raises(EkError):
        write_submission(good_csv, ["1", "1"], ["-", "-"])
    assert good_csv.read_text() == before


def test_write_empty_rle_as_dash(tmp_path: Path):
    path = tmp_path / "s.csv"
    write_submission(path, ["123"], [""])
    assert path.read_text() == f"{HEADER}\n123,-\n"


@pytest.mark.parametrize(
    "ids, rles, message",
    [
        (["1", "2"], ["-"], "2 record ids but 1 RLEs"),
        ([1002653297254493116], ["-"], "must be digit strings"),
        ([1.0026532972544932e18], ["-"], "must be digit strings"),
        (["1.0026532972544932e+18"], ["-"], "must be digit strings"),
        (["12", "12"], ["-", "-"], "12 appears more than once"),
        (["12"], ["1 2,3"], "not a one-line RLE"),
        (["12"], [None], "not a one-line RLE"),
    ],
)
def test_write_rejects_bad_rows(tmp_path: Path, ids, rles, message):
    path = tmp_path / "s.csv"
    with pytest.raises(EkError, match=message):
        write_submission(path, ids, rles)
    assert not path.exists()


def test_round_trip_of_real_masks(tmp_path: Path):
    rng = np.random.default_rng(0)
    masks = [rng.random((256, 256)) < p for p in (0.0, 0.001, 0.5)]
    path = tmp_path / "s.csv"
    write_submission(path, IDS, [encode(m) for m in masks])
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    for mask, rle in zip(masks, frame["encoded_pixels"]):
        np.testing.assert_array_equal(decode(rle, (256, 256)), mask)


# --- check_submission ---------------------------------------------------------------


def test_check_good_file_summary(good_csv: Path):
    summary = check_submission(good_csv)
    assert summary == {
        "path": str(good_csv),
        "rows": 3,
        "empty_rows": 1,
        "positive_pixels": 3 + 2 + 2,
    }


def test_check_with_data_root_and_sample(good_csv: Path, tmp_path: Path):
    root = make_data_root(tmp_path / "data", IDS, sample_ids=IDS[::-1])
    assert check_submission(good_csv, data_root=root)["rows"] == 3


def test_check_accepts_empty_field_crlf_and_blank_free_end(tmp_path: Path):
    path = write_csv(tmp_path / "s.csv", f"{HEADER}\r\n12,\r\n13,1 1\r\n")
    assert check_submission(path)["empty_rows"] == 1


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "line 1: header is ''"),
        ("record_id,encoded_pixels,extra\n12,-\n", "line 1: header"),
        ("id,encoded_pixels\n12,-\n", "line 1: header"),
        ("\ufeffrecord_id,encoded_pixels\n12,-\n", "line 1: header"),
        ("Record_Id,Encoded_Pixels\n12,-\n", "line 1: header"),
        (f"{HEADER}\n12,-\n12,1 3\n", "line 3: record 12 appears more than once .first on line 2"),
        (f"{HEADER}\n12,-\n\n13,-\n", "line 3: blank line"),
        (f"{HEADER}\n12,1 3,4\n13,-\n", "line 2: 3 fields, expected 2"),
        (f"{HEADER}\n12,-\n13\n", "line 3: 1 fields, expected 2"),
        (f"{HEADER}\n1.0026532972544932e+18,-\n", "line 2: .*not a digit string .a float-mangled"),
        (f"{HEADER}\n12,-\n 13,-\n", "line 3: record_id ' 13' is not a digit string"),
        (f"{HEADER}\n12,-\nabc,-\n", "line 3: record_id 'abc'"),
        (f"{HEADER}\n12,-\n13,1 2 3\n", "line 3 .record 13.: RLE has an odd number"),
        (f"{HEADER}\n12,0 3\n", "line 2 .record 12.: RLE pair 1 has start 0"),
        (f"{HEADER}\n12,5 1 1 1\n", "line 2 .record 12.: .*not ascending"),
        (f"{HEADER}\n12,1 5 3 1\n", "overlap"),
        (f"{HEADER}\n12,1 2 3 1\n", "touch"),
        (f"{HEADER}\n12,65536 2\n", "line 2 .record 12.: .*past the image end"),
        (f"{HEADER}\n12,1 x\n", "'x' is not a positive integer"),
    ],
)
def test_check_rejects_bad_files(tmp_path: Path, text: str, message: str):
    path = write_csv(tmp_path / "bad.csv", text)
    with pytest.raises(EkError, match=message) as caught:
        check_submission(path)
    assert str(caught.value).startswith(str(path)) and "\n" not in str(caught.value)


def test_check_missing_file(tmp_path: Path):
    with pytest.raises(EkError, match="no such file"):
        check_submission(tmp_path / "nope.csv")


def test_check_uses_shape(tmp_path: Path):
    path = write_csv(tmp_path / "s.csv", f"{HEADER}\n12,16 1\n")
    assert check_submission(path, shape=(4, 4))["positive_pixels"] == 1
    with pytest.raises(EkError, match="past the image end .16 pixels"):
        check_submission(write_csv(tmp_path / "t.csv", f"{HEADER}\n12,17 1\n"), shape=(4, 4))


def test_check_missing_and_extra_records_against_folders(good_csv: Path, tmp_path: Path):
    root = make_data_root(tmp_path / "data", IDS[:2] + ["999"])
    with pytest.raises(
        EkError, match=r"1 records of .*test/ missing \(e.g. 999\); 1 records not in"
    ):
        check_submission(good_csv, data_root=root)


def test_check_against_sample_submission(good_csv: Path, tmp_path: Path):
    root = make_data_root(tmp_path / "data", IDS, sample_ids=IDS[:2])
    with pytest.raises(EkError, match="records not in .*sample_submission.csv"):
        check_submission(good_csv, data_root=root)


def test_sample_submission_only_checked_for_test_split(tmp_path: Path):
    root = tmp_path / "data"
    (root / "validation" / "12").mkdir(parents=True)
    (root / "sample_submission.csv").write_text(f"{HEADER}\n99,-\n")
    path = write_csv(tmp_path / "s.csv", f"{HEADER}\n12,1 1\n")
    assert check_submission(path, data_root=root, split="validation")["rows"] == 1


def test_check_missing_split_folder(good_csv: Path, tmp_path: Path):
    with pytest.raises(EkError, match="no 'test/' folder"):
        check_submission(good_csv, data_root=tmp_path / "empty")


# --- the real Kaggle sample ----------------------------------------------------------


@pytest.fixture
def sample_root() -> Path:
    if not (SAMPLE_ROOT / "sample_submission.csv").is_file():
        pytest.skip(f"contrails sample not found at {SAMPLE_ROOT}")
    return SAMPLE_ROOT


def test_real_sample_submission_passes(sample_root: Path):
    summary = check_submission(sample_root / "sample_submission.csv", data_root=sample_root)
    test_ids = sorted(p.name for p in (sample_root / "test").iterdir() if p.is_dir())
    assert summary["rows"] == len(test_ids) > 0
    assert summary["empty_rows"] == summary["rows"]


def test_written_submission_for_real_test_ids_passes(sample_root: Path, tmp_path: Path):
    ids = pd.read_csv(sample_root / "sample_submission.csv", dtype=str, keep_default_na=False)
    record_ids = ids["record_id"].tolist()
    rles = [encode(np.eye(256, dtype=bool)) for _ in record_ids]
    path = tmp_path / "submission.csv"
    write_submission(path, record_ids, rles)
    summary = check_submission(path, data_root=sample_root)
    assert summary["positive_pixels"] == 256 * len(record_ids)


def test_real_sample_rejects_missing_record(sample_root: Path, tmp_path: Path):
    path = write_csv(tmp_path / "s.csv", f"{HEADER}\n")
    with pytest.raises(EkError, match="missing"):
        check_submission(path, data_root=sample_root)


def test_check_with_data_uses_the_data_size(tmp_path: Path):
    from ensemble_kit.data.synth import write_synthetic

    root = tmp_path / "data"
    write_synthetic(root, n_train=1, n_validation=1, n_test=2, size=32, seed=0)
    ids = sorted(p.name for p in (root / "test").iterdir())
    # pixel 1000 fits 256 x 256 but not the data's 32 x 32 (1024 pixels)
    path = write_csv(tmp_path / "s.csv", f"{HEADER}\n{ids[0]},1000 30\n{ids[1]},-\n")
    assert check_submission(path)["rows"] == 2
    with pytest.raises(EkError, match="line 2"):
        check_submission(path, data_root=root, split="test")
    fits = write_csv(tmp_path / "ok.csv", f"{HEADER}\n{ids[0]},1000 20\n{ids[1]},-\n")
    assert check_submission(fits, data_root=root, split="test")["positive_pixels"] == 20
