"""Small DICOM writers for tests and benchmarks: a numpy volume + explicit geometry → files.

Not the project's synthetic-study generator; just enough DICOM to exercise decoding, stacking and
geometry (RLE Lossless or uncompressed, MONOCHROME1/2, signed, rescaled, oblique, shuffled).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, RLELossless, generate_uid


@dataclass(frozen=True)
class Geometry:
    """Per-slice ImagePositionPatient, one ImageOrientationPatient and PixelSpacing [row, col]."""

    positions: np.ndarray  # [S, 3]
    orientation: tuple[float, ...]  # 6
    pixel_spacing: tuple[float, float]  # [row spacing, column spacing]


def rotation(axis: Sequence[float], degrees: float) -> np.ndarray:
    """3x3 rotation matrix about `axis` (Rodrigues)."""
    a = np.asarray(axis, dtype=np.float64)
    a = a / np.linalg.norm(a)
    t = np.radians(degrees)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def plane_geometry(
    n_slices: int,
    col_dir: Sequence[float],
    row_dir: Sequence[float],
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    pixel_spacing: tuple[float, float] = (0.5, 0.5),
    step: float = 4.0,
) -> Geometry:
    """Parallel slices: first at `origin`, then `step` mm apart along cross(col_dir, row_dir)."""
    x = np.asarray(col_dir, dtype=np.float64)
    y = np.asarray(row_dir, dtype=np.float64)
    n = np.cross(x, y)
    n /= np.linalg.norm(n)
    pos = np.asarray(origin, dtype=np.float64) + np.arange(n_slices)[:, None] * step * n
    return Geometry(pos, tuple(float(v) for v in (*x, *y)), pixel_spacing)


def sagittal(n_slices: int, **kw) -> Geometry:
    """Sagittal slices: columns run posterior (+y), rows run inferior (-z); stepping along the normal -x."""
    return plane_geometry(n_slices, (0, 1, 0), (0, 0, -1), **kw)


def axial(n_slices: int, tilt_deg: float = 0.0, **kw) -> Geometry:
    """Axial slices: columns +x, rows +y, tilted about the x axis by `tilt_deg` (oblique blocks)."""
    r = rotation((1, 0, 0), tilt_deg)
    return plane_geometry(n_slices, r @ [1, 0, 0], r @ [0, 1, 0], **kw)


def make_dataset(
    pixels: np.ndarray,
    position: Sequence[float],
    orientation: Sequence[float],
    pixel_spacing: Sequence[float],
    instance_number: int,
    series_uid: str,
    frame_uid: str,
    *,
    compress: bool = True,
    bits_stored: int = 12,
    signed: bool = False,
    photometric: str = "MONOCHROME2",
    slope: float | None = None,
    intercept: float | None = None,
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "M", "NONE"),
    raw_bytes: bytes | None = None,
) -> Dataset:
    """One MR slice dataset from stored values [H, W] (uint16 or int16)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_uid
    ds.ImageType = list(image_type)
    ds.InstanceNumber = int(instance_number)
    ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
    ds.ImageOrientationPatient = [f"{v:.8f}" for v in orientation]
    ds.PixelSpacing = [f"{v:.6f}" for v in pixel_spacing]
    ds.SliceThickness = "3.5"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    if slope is not None:
        ds.RescaleSlope = f"{slope}"
    if intercept is not None:
        ds.RescaleIntercept = f"{intercept}"
    arr = np.ascontiguousarray(pixels.astype(np.int16 if signed else np.uint16))
    if raw_bytes is not None:
        ds.PixelData = raw_bytes
    elif compress:
        ds.compress(RLELossless, arr)
    else:
        ds.PixelData = arr.tobytes()
    return ds


def write_series(
    directory: str,
    volume: np.ndarray,
    geom: Geometry,
    instance_numbers: Sequence[int] | None = None,
    *,
    frame_uid: str | None = None,
    series_uid: str | None = None,
    **kw,
) -> list[str]:
    """Write volume [S, H, W] (stored values) as `{instance}.dcm` files; returns the paths in slice order."""
    os.makedirs(directory, exist_ok=True)
    n = volume.shape[0]
    numbers = list(instance_numbers) if instance_numbers is not None else list(range(1, n + 1))
    series_uid = series_uid or generate_uid()
    frame_uid = frame_uid or generate_uid()
    paths = []
    for k in range(n):
        ds = make_dataset(volume[k], geom.positions[k], geom.orientation, geom.pixel_spacing, numbers[k], series_uid, frame_uid, **kw)
        path = os.path.join(directory, f"{numbers[k]}.dcm")
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_non_image(path: str) -> str:
    """A valid DICOM object with no pixels (a Basic Text SR), as found beside images in some series."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "SR"
    ds.InstanceNumber = 999
    ds.save_as(path, enforce_file_format=True)
    return path


def truncate(path: str, keep: float = 0.5) -> None:
    """Cut a file to a fraction of its length (an interrupted copy)."""
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])


def phantom(n_slices: int, rows: int, cols: int, seed: int = 0, bits: int = 12) -> np.ndarray:
    """A smooth, MR-like uint16 volume (blobs + noise) in [0, 2**bits) that RLE compresses realistically."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(np.linspace(-1, 1, n_slices), np.linspace(-1, 1, rows), np.linspace(-1, 1, cols), indexing="ij")
    vol = np.zeros((n_slices, rows, cols), dtype=np.float32)
    for _ in range(6):
        c = rng.uniform(-0.6, 0.6, 3)
        r = rng.uniform(0.1, 0.4)
        vol += rng.uniform(0.3, 1.0) * np.exp(-((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) / r**2)
    vol = vol / max(float(vol.max()), 1e-6) * (2**bits - 1) * 0.8
    vol += rng.normal(0, 20, vol.shape)
    return np.clip(vol, 0, 2**bits - 1).astype(np.uint16)


def write_study(
    root: str,
    split: str,
    study_id: int,
    rows: int = 64,
    cols: int = 64,
    slices: tuple[int, int, int] = (6, 6, 8),
    rng: np.random.Generator | None = None,
) -> list[tuple[int, int, str]]:
    """One study in Kaggle layout: Sagittal T1, Sagittal T2/STIR and a two-block oblique Axial T2
    (instance numbers shuffled, starting at 1, 101 and 201); returns its (study, series, description) rows."""
    rng = rng if rng is not None else np.random.default_rng(study_id)
    out = []
    for j, (desc, n) in enumerate(zip(("Sagittal T1", "Sagittal T2/STIR", "Axial T2"), slices, strict=True)):
        series_id = study_id * 10 + j + 1
        out.append((study_id, series_id, desc))
        d = os.path.join(root, f"{split}_images", str(study_id), str(series_id))
        vol = phantom(n, rows, cols, seed=int(rng.integers(1 << 30)))
        numbers = list(rng.permutation(n) + 1 + 100 * j)
        if desc.startswith("Axial"):
            half = n // 2
            frame, series_uid = generate_uid(), generate_uid()
            g1 = axial(half, tilt_deg=-12.0, origin=(-16, -16, -40.0 - 4.0 * half), step=4.0)
            g2 = axial(n - half, tilt_deg=10.0, origin=(-16, -16, 0.0), step=4.0)
            write_series(d, vol[:half], g1, numbers[:half], frame_uid=frame, series_uid=series_uid)
            write_series(d, vol[half:], g2, numbers[half:], frame_uid=frame, series_uid=series_uid)
        else:
            g = sagittal(n, origin=(-12.0, -16.0, 16.0), pixel_spacing=(0.5, 0.6), step=4.0)
            write_series(d, vol, g, numbers)
    return out


def write_series_csv(root: str, split: str, rows: Sequence[tuple[int, int, str]]) -> None:
    """Write `{split}_series_descriptions.csv`."""
    with open(os.path.join(root, f"{split}_series_descriptions.csv"), "w") as f:
        f.write("study_id,series_id,series_description\n")
        f.writelines(f"{a},{b},{c}\n" for a, b, c in rows)


def write_study_tree(
    root: str,
    split: str,
    studies: Sequence[int],
    rows: int = 64,
    cols: int = 64,
    slices: tuple[int, int, int] = (6, 6, 8),
    seed: int = 0,
) -> None:
    """A Kaggle-layout tree of `write_study` studies plus its `{split}_series_descriptions.csv`."""
    rng = np.random.default_rng(seed)
    lines = [r for s in studies for r in write_study(root, split, s, rows, cols, slices, rng)]
    write_series_csv(root, split, lines)
