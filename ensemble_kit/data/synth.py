"""A synthetic contrail data set in the exact Kaggle layout, for tests and demos.

``write_synthetic`` writes ``train/``, ``validation/`` and ``test/`` record folders and a
``sample_submission.csv`` that :mod:`ensemble_kit.data` reads like the real thing:

- nine bands ``band_08.npy`` ... ``band_16.npy``, float32 ``(S, S, 8)`` brightness
  temperatures in K with realistic per-band levels (water-vapour bands ~230-260 K, window
  bands ~280-300 K over clear sky);
- a smooth surface, drifting low water clouds and thin cirrus (cold, and they shift the
  ash band differences: distractors), and sensor noise;
- contrails: thin (1-3 px at 256), long, slightly curved streaks of thin ice cloud, which
  make B14 colder, B15-B14 more negative and B14-B11 smaller. Each is born at some frame,
  grows as the aircraft flies, drifts with the wind and widens with age, so the frames
  around the labelled frame 4 carry signal;
- labels for frame 4, sitting +0.5 px down and right of the imagery like the real ones;
  ``R`` (3-6) annotators who miss contrails, draw them wider or thinner and stop short;
  the aggregated mask is "more than half of the annotators". About half of the labelled
  records are empty.

Everything is a deterministic function of the arguments: the content of record ``k`` of a
split depends only on ``(seed, split, k)`` and on whether it was drawn empty (exactly half
of each split, in a seeded order); ids are drawn in order train, validation, test.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.fft
from tqdm import tqdm

from ..errors import EkError
from ..files import write_text
from .records import INDIVIDUAL_FILE, LABELLED_FRAME, MASK_FILE, N_FRAMES, band_file

log = logging.getLogger(__name__)

BANDS = (8, 9, 10, 11, 12, 13, 14, 15, 16)
SPLIT_SEEDS = {"train": 1, "validation": 2, "test": 3}
MIN_SIZE = 32
# Optical-depth factor of each band relative to B14 for ice and for liquid water cloud:
# ice absorbs more at 12.3 um (B15) and less at 8.4 um (B11) than at 11.2 um (B14).
ICE_FACTOR = {8: 0.3, 9: 0.4, 10: 0.5, 11: 0.7, 12: 0.85, 13: 0.97, 14: 1.0, 15: 1.25, 16: 1.05}
WATER_FACTOR = {8: 0.0, 9: 0.05, 10: 0.15, 11: 1.08, 12: 0.9, 13: 0.99, 14: 1.0, 15: 1.04, 16: 1.0}
FRAME_OFFSETS = np.arange(N_FRAMES) - LABELLED_FRAME
AIRCRAFT_PX_PER_FRAME = 75.0  # ~250 m/s over 10 min at 2 km pixels, at size 256


@dataclass(frozen=True)
class Contrail:
    """One contrail in label pixel coordinates at the labelled frame.

    The track starts at ``(x0, y0)`` heading ``angle`` and bends as ``v = bend * u**2`` in
    track coordinates (``u`` along, ``v`` across); ``length`` is its full length.
    """

    x0: float
    y0: float
    angle: float
    bend: float
    length: float
    half_width: float  # of the label at the labelled frame, px
    opacity: float  # peak emissivity at B14
    birth: int  # first frame it is visible in
    drift: tuple[float, float]  # (dx, dy) px per frame


def write_synthetic(
    out: Path,
    n_train: int = 64,
    n_validation: int = 16,
    n_test: int = 16,
    size: int = 256,
    seed: int = 0,
) -> dict:
    """Write a synthetic data set in the Kaggle layout under ``out``.

    Args:
        out: Destination folder; its ``train/``, ``validation/`` and ``test/`` must not
            already hold records.
        n_train: Records in ``train/`` (bands, aggregated and individual masks).
        n_validation: Records in ``validation/`` (bands and aggregated mask).
        n_test: Records in ``test/`` (bands only), also listed in ``sample_submission.csv``.
        size: Side ``S`` of every image (bands ``(S, S, 8)``); at least 32.
        seed: Everything written is a deterministic function of it.

    Returns:
        ``{"train": n, "validation": n, "test": n, "empty": n}``: records per split and
        labelled records whose aggregated mask is empty.

    Raises:
        EkError: a bad count or size, or ``out`` already holding records.
    """
    counts = {"train": n_train, "validation": n_validation, "test": n_test}
    _check_arguments(Path(out), counts, size)
    split_ids = _split_list(record_ids(sum(counts.values()), seed), counts)
    jobs = [
        (split, index, record_id, is_empty)
        for split, n in counts.items()
        for index, (record_id, is_empty) in enumerate(
            zip(split_ids[split], _empty_flags(n, split, seed))
        )
    ]
    empty = 0
    for split, index, record_id, is_empty in tqdm(jobs, desc="synthetic records", disable=None):
        rng = np.random.default_rng([seed, SPLIT_SEEDS[split], index])
        empty += _write_record(Path(out) / split / record_id, split, rng, size, is_empty)
    test_rows = "".join(f"{record_id},-\n" for record_id in sorted(split_ids["test"]))
    write_text(Path(out) / "sample_submission.csv", "record_id,encoded_pixels\n" + test_rows)
    log.info("wrote %s synthetic records of %d px to %s", counts, size, out)
    return {**counts, "empty": empty}


def _check_arguments(out: Path, counts: dict, size: int) -> None:
    for split, n in counts.items():
        if not isinstance(n, int) or n < 0:
            raise EkError(f"synthetic data: the number of {split} records must be >= 0, got {n!r}")
        if (out / split).is_dir() and any(p.name[0] != "." for p in (out / split).iterdir()):
            raise EkError(f"{out / split}: already holds records; choose an empty folder")
    if not isinstance(size, int) or size < MIN_SIZE:
        raise EkError(f"synthetic data: size must be an integer >= {MIN_SIZE}, got {size!r}")


def record_ids(n: int, seed: int) -> list[str]:
    """``n`` unique record ids of 15-19 digits, most above 2**53 like the real ones."""
    rng = np.random.default_rng([seed, 0])
    ids: list[str] = []
    seen: set[str] = set()
    while len(ids) < n:
        n_digits = int(rng.choice([15, 16, 17, 18, 19], p=[0.02, 0.08, 0.15, 0.25, 0.5]))
        digits = [int(rng.integers(1, 10))] + rng.integers(0, 10, n_digits - 1).tolist()
        record_id = "".join(map(str, digits))
        if record_id not in seen:
            seen.add(record_id)
            ids.append(record_id)
    return ids


def _split_list(ids: list[str], counts: dict) -> dict[str, list[str]]:
    out, start = {}, 0
    for split, n in counts.items():
        out[split] = ids[start : start + n]
        start += n
    return out


def _empty_flags(n: int, split: str, seed: int) -> np.ndarray:
    """Exactly ``n // 2`` records drawn empty, in a seeded order."""
    rng = np.random.default_rng([seed, SPLIT_SEEDS[split], 10**6])
    return rng.permutation(n) < n // 2


def _write_record(
    folder: Path, split: str, rng: np.random.Generator, size: int, is_empty: bool
) -> int:
    """Write one record (to a hidden folder, then renamed); 1 if its label is empty."""
    contrails = draw_contrails(rng, size, is_empty)
    bands = np.ascontiguousarray(render_bands(rng, size, contrails).transpose(0, 2, 3, 1))
    individual = annotate(rng, size, [c for c in contrails if c.birth <= LABELLED_FRAME])
    aggregated = (2 * individual.sum(axis=-1, keepdims=True) > individual.shape[-1]).astype(
        np.int32
    )
    tmp = folder.parent / f".{folder.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for band, values in zip(BANDS, bands):
        np.save(tmp / band_file(band), values)
    if split != "test":
        np.save(tmp / MASK_FILE, aggregated[:, :, :, 0])
    if split == "train":
        np.save(tmp / INDIVIDUAL_FILE, individual)
    os.replace(tmp, folder)
    return int(split != "test" and not aggregated.any())


def draw_contrails(rng: np.random.Generator, size: int, is_empty: bool) -> list[Contrail]:
    """The contrails of one record: none labelled when ``is_empty``, else 1-6.

    Either kind of record may also hold contrails born after the labelled frame, which
    are not labelled (they are not in frame 4).
    """
    n_labelled = 0 if is_empty else min(int(rng.geometric(0.3)), 6)
    n_late = int(rng.random() < 0.3)
    # Contrails of one scene share flight corridors and the upper-level wind.
    heading = rng.uniform(0, 2 * np.pi)
    wind = (
        rng.uniform(0.5, 3.0)
        * size
        / 256
        * np.array([np.cos(heading + 1.3), np.sin(heading + 1.3)])
    )
    births = [int(rng.integers(0, LABELLED_FRAME + 1)) for _ in range(n_labelled)]
    births += [int(rng.integers(LABELLED_FRAME + 1, N_FRAMES)) for _ in range(n_late)]
    return [
        _one_contrail(rng, size, heading, wind, birth, k == 0) for k, birth in enumerate(births)
    ]


def _one_contrail(
    rng: np.random.Generator, size: int, heading: float, wind, birth: int, first: bool
) -> Contrail:
    scale = size / 256
    drift = wind + rng.normal(0, 0.2, 2) * scale
    length = max(rng.uniform(40, 200) * scale, 12.0)
    angle = heading + rng.normal(0, 0.35) + np.pi * (rng.random() < 0.5)
    turn = rng.uniform(-0.35, 0.35)  # total heading change along the track, radians
    margin = -0.15 * size if first else 0.1 * size  # the first one starts well inside
    return Contrail(
        x0=rng.uniform(-margin, size + margin),
        y0=rng.uniform(-margin, size + margin),
        angle=angle,
        bend=turn / (2 * length),
        length=length,
        half_width=max(rng.uniform(0.5, 1.5) * np.sqrt(scale), 0.7),
        opacity=rng.uniform(0.1, 0.25),
        birth=birth,
        drift=(float(drift[0]), float(drift[1])),
    )


def track_distance(contrail: Contrail, x: np.ndarray, y: np.ndarray, u_range: tuple[float, float]):
    """Distance (px) from points ``(x, y)`` to the part ``u_range`` of a contrail's track.

    ``u_range`` is in track coordinates (0 at the start, ``length`` at the end). The bend is
    slight, so the offset from the parabola over its slope term is the distance.
    """
    cos, sin = np.cos(contrail.angle), np.sin(contrail.angle)
    u = (x - contrail.x0) * cos + (y - contrail.y0) * sin
    v = -(x - contrail.x0) * sin + (y - contrail.y0) * cos
    inside = np.abs(v - contrail.bend * u**2) / np.sqrt(1 + (2 * contrail.bend * u) ** 2)
    u_end = np.clip(u, *u_range)
    outside = np.hypot(u - u_end, v - contrail.bend * u_end**2)
    return np.where((u >= u_range[0]) & (u <= u_range[1]), inside, outside)


def _track_grid(contrail: Contrail, u_range, shift: np.ndarray, margin: float, size: int):
    """Pixel window around part of a track drawn at ``pixel = point + shift``.

    Returns the window's slices and its pixels' ``(x, y)`` in the track's frame.
    """
    u = np.linspace(u_range[0], u_range[1], 9)
    v = contrail.bend * u**2
    cos, sin = np.cos(contrail.angle), np.sin(contrail.angle)
    xs = contrail.x0 + u * cos - v * sin + shift[0]
    ys = contrail.y0 + u * sin + v * cos + shift[1]
    cols = _clipped_slice(xs.min() - margin, xs.max() + margin + 2, size)
    rows = _clipped_slice(ys.min() - margin, ys.max() + margin + 2, size)
    grid_y, grid_x = np.mgrid[rows, cols].astype(np.float32)
    return (rows, cols), grid_x - shift[0], grid_y - shift[1]


def _clipped_slice(start: float, stop: float, size: int) -> slice:
    start, stop = (int(np.clip(bound, 0, size)) for bound in (start, stop))
    return slice(start, max(start, stop))


def _grown_length(contrail: Contrail, frame: int, size: int) -> float:
    """Track length drawn by ``frame``: the aircraft flies on from the start since birth."""
    return min(contrail.length, AIRCRAFT_PX_PER_FRAME * size / 256 * (frame - contrail.birth + 1))


def contrail_depth(contrails: list[Contrail], size: int) -> np.ndarray:
    """Optical depth at B14 of all contrails in each frame, float32 ``(8, S, S)``.

    Frame ``f`` shows each track drifted by the wind, grown at aircraft speed since its
    birth and widened with age; the imagery sits 0.5 px up-left of the label.
    """
    depth = np.zeros((N_FRAMES, size, size), np.float32)
    for contrail in contrails:
        peak = -np.log1p(-contrail.opacity)
        for frame in range(contrail.birth, N_FRAMES):
            age_vs_label = frame - LABELLED_FRAME
            sigma = max(0.5, 0.75 * contrail.half_width) * max(1 + 0.15 * age_vs_label, 0.5)
            shift = np.multiply(contrail.drift, age_vs_label) - 0.5
            u_range = (0.0, _grown_length(contrail, frame, size))
            window, x, y = _track_grid(contrail, u_range, shift, 4 * sigma + 2, size)
            distance = track_distance(contrail, x, y, u_range)
            depth[frame][window] += peak * np.exp(-0.5 * (distance / sigma) ** 2)
    return depth


def annotate(rng: np.random.Generator, size: int, contrails: list[Contrail]) -> np.ndarray:
    """Individual annotator masks of the labelled frame, int32 ``(S, S, 1, R)``, R in 3..6.

    Each annotator misses a contrail now and then (never the first one), draws it wider
    or thinner, and may stop short of either end.
    """
    n_annotators = int(rng.integers(3, 7))
    masks = np.zeros((size, size, 1, n_annotators), np.int32)
    for index, contrail in enumerate(contrails):
        grown = _grown_length(contrail, LABELLED_FRAME, size)
        for annotator in range(n_annotators):
            if index > 0 and rng.random() < 0.15:
                continue
            u_range = (0.0, grown)
            if rng.random() < 0.35:
                cut = rng.uniform(0, 0.35) * grown
                u_range = (cut, grown) if rng.random() < 0.5 else (0.0, grown - cut)
            half_width = max(contrail.half_width + rng.normal(0, 0.3), 0.35)
            window, x, y = _track_grid(contrail, u_range, np.zeros(2), half_width + 2, size)
            drawn = track_distance(contrail, x, y, u_range) <= half_width
            masks[window + (0, annotator)] |= drawn
    return masks


def render_bands(rng: np.random.Generator, size: int, contrails: list[Contrail]) -> np.ndarray:
    """Brightness temperatures in K of the nine bands, float32 ``(9, 8, S, S)``."""
    bands = clear_sky(rng, size)
    low_wind, high_wind = rng.normal(0, 1.2, (2, 2)) * size / 256
    low = _cloud_opacity(rng, size, low_wind, cover=rng.uniform(0.0, 0.5), peak=1.0, scale=size / 8)
    _overlay(bands, low, WATER_FACTOR, top_k=rng.uniform(235.0, 268.0))
    cirrus = _cloud_opacity(
        rng, size, high_wind, cover=rng.uniform(0.0, 0.35), peak=0.35, scale=size / 10
    )
    _overlay(bands, cirrus, ICE_FACTOR, top_k=rng.uniform(210.0, 230.0))
    if contrails:
        opacity = 1 - np.exp(-contrail_depth(contrails, size))
        _overlay(bands, opacity, ICE_FACTOR, top_k=rng.uniform(208.0, 232.0))
    # Uniform sensor noise of the drawn std: as good as Gaussian here, and faster to draw.
    noise = rng.random(bands.shape, dtype=np.float32) - np.float32(0.5)
    noise *= np.float32(rng.uniform(0.08, 0.25) * np.sqrt(12))
    bands += noise
    return bands


def clear_sky(rng: np.random.Generator, size: int) -> np.ndarray:
    """Cloud-free brightness temperatures, float32 ``(9, 8, S, S)``: surface and water vapour."""
    still = np.zeros((1, 2))
    surface = rng.uniform(280.0, 298.0) + 3.0 * smooth_fields(
        rng, size, size / 4, still, detail=0.2
    )
    moisture = smooth_fields(rng, size, size / 6, still)
    vapour = rng.uniform(228.0, 238.0) + 1.5 * smooth_fields(rng, size, size / 5, still)
    levels = [
        vapour,
        vapour + rng.uniform(7.0, 10.0),
        vapour + rng.uniform(15.0, 20.0),
        surface - rng.uniform(-0.5, 3.5) - 0.8 * moisture,
        surface - rng.uniform(18.0, 30.0),
        surface + rng.uniform(0.8, 1.4),
        surface,
        surface - rng.uniform(2.0, 4.2) - 0.4 * moisture,
        surface - rng.uniform(19.0, 27.0) - 0.5 * moisture,
    ]
    return np.repeat(np.stack(levels), N_FRAMES, axis=1)


def _cloud_opacity(
    rng, size: int, wind: np.ndarray, cover: float, peak: float, scale: float
) -> np.ndarray:
    """Emissivity at B14 ``(8, S, S)`` of a drifting cloud layer covering about ``cover``."""
    field = smooth_fields(rng, size, scale, np.outer(FRAME_OFFSETS, wind), detail=0.35)
    threshold = np.quantile(field[LABELLED_FRAME], 1 - cover) if cover > 0 else np.inf
    return peak * np.clip((field - threshold) / 0.6, 0.0, 1.0) ** 1.5


def _overlay(bands: np.ndarray, opacity_b14: np.ndarray, factor: dict, top_k: float) -> None:
    """Put a layer of emissivity ``opacity_b14`` (at B14) and temperature ``top_k`` on top."""
    covered = np.flatnonzero(opacity_b14 > 1e-4)  # contrails and clouds cover little
    depth = -np.log1p(-np.clip(opacity_b14.ravel()[covered], 0.0, 0.999))
    for index, band in enumerate(BANDS):
        values = bands[index].reshape(-1)
        values[covered] -= -np.expm1(-factor[band] * depth) * (values[covered] - top_k)


def smooth_fields(
    rng, size: int, scale: float, shifts: np.ndarray, detail: float = 0.0
) -> np.ndarray:
    """A smooth random field of unit std, float32 ``(len(shifts), S, S)``, moved by ``shifts``.

    Gaussian low-pass white noise (correlation ``scale`` px, plus ``detail`` times a
    component four times finer) on a periodic grid larger than the image; the sub-pixel
    shifts ``(dx, dy)`` per frame are phase ramps, so a cloud drifts smoothly.
    """
    n = scipy.fft.next_fast_len(size + int(np.abs(shifts).max() + 2 * scale) + 2, real=True)
    spectrum = scipy.fft.rfft2(rng.standard_normal((n, n), dtype=np.float32))
    ky, kx = np.fft.fftfreq(n)[:, None], np.fft.rfftfreq(n)[None, :]
    k2 = (kx**2 + ky**2).astype(np.float32)
    spectrum *= _lowpass(k2, scale) + detail * _lowpass(k2, scale / 4)
    # The phase ramp of a shift is separable: one row factor times one column factor.
    ramp_x = np.exp(-2j * np.pi * kx * shifts[:, :1, None]).astype(np.complex64)
    ramp_y = np.exp(-2j * np.pi * ky * shifts[:, 1:, None]).astype(np.complex64)
    fields = scipy.fft.irfft2(spectrum * ramp_y * ramp_x, s=(n, n))[:, :size, :size]
    return ((fields - fields.mean()) / max(float(fields.std()), 1e-9)).astype(np.float32)


def _lowpass(k2: np.ndarray, scale: float) -> np.ndarray:
    """Gaussian filter of width ``scale`` px that keeps unit-variance noise at unit variance."""
    return np.exp(-2 * (np.pi * scale) ** 2 * k2) * (2 * np.sqrt(np.pi) * scale)
