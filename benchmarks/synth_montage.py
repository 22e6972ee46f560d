"""A montage of rendered slices per preset: the middle slice of every series of a few studies, one PNG.

    python benchmarks/synth_montage.py docs/synth_realistic.png --preset realistic --studies 4
    python benchmarks/synth_montage.py docs/synth_simple.png --preset simple --studies 4

Generates the studies into a temporary folder, reads the DICOM files back (so what you see is
what a model reads), orders each series along its slice normal and tiles its middle slice,
windowed at the 0.5–99.5th percentile, one row per study: Sagittal T1, Sagittal T2/STIR, Axial T2
(for block axial series, the middle slice of the L4/L5 block).
"""

from __future__ import annotations

import argparse
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom

from spine_ray.core.config import load
from spine_ray.core.schema import AXIAL_T2, SAGITTAL_T1, SAGITTAL_T2
from spine_ray.synth.generate import generate
from spine_ray.synth.study import PRESETS, SynthConfig

TILE = 224


def write_png(path: Path, img: np.ndarray) -> None:
    """An 8-bit greyscale PNG, written with zlib alone."""
    h, w = img.shape
    raw = b"".join(b"\x00" + img[r].tobytes() for r in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def tile(img: np.ndarray, spacing: tuple[float, float]) -> np.ndarray:
    """Window to 8 bits and resample to TILE × TILE keeping the physical aspect ratio."""
    lo, hi = np.percentile(img, [0.5, 99.5])
    g = np.clip((img - lo) / max(hi - lo, 1e-6) * 255, 0, 255)
    g = (g.astype(np.uint8) // 2) * 2  # 7 bits: invisible here, and keeps noisy PNGs under 400 kB
    h_mm, w_mm = img.shape[0] * spacing[0], img.shape[1] * spacing[1]
    s = TILE / max(h_mm, w_mm)
    rows, cols = int(h_mm * s), int(w_mm * s)
    yi = np.clip(((np.arange(rows) + 0.5) / s / spacing[0]).astype(int), 0, img.shape[0] - 1)
    xi = np.clip(((np.arange(cols) + 0.5) / s / spacing[1]).astype(int), 0, img.shape[1] - 1)
    out = np.zeros((TILE, TILE), np.uint8)
    out[(TILE - rows) // 2 : (TILE - rows) // 2 + rows, (TILE - cols) // 2 : (TILE - cols) // 2 + cols] = g[yi][:, xi]
    return out


def middle_slice(folder: Path) -> np.ndarray:
    """The middle slice of a series (along its normal; for blocks, of the fourth block or the last)."""
    dss = [pydicom.dcmread(p) for p in folder.glob("*.dcm")]
    o = np.asarray(dss[0].ImageOrientationPatient, dtype=float)
    normals = [np.cross(np.asarray(d.ImageOrientationPatient[:3], float), np.asarray(d.ImageOrientationPatient[3:], float)) for d in dss]
    dss = [d for d, n in sorted(zip(dss, normals, strict=True), key=lambda t: float(np.asarray(t[0].ImagePositionPatient, float) @ np.cross(o[:3], o[3:])))]
    blocks: list[list] = []
    for d in dss:
        n = tuple(np.round(np.cross(np.asarray(d.ImageOrientationPatient[:3], float), np.asarray(d.ImageOrientationPatient[3:], float)), 3))
        if not blocks or blocks[-1][0] != n:
            blocks.append([n, []])
        blocks[-1][1].append(d)
    group = blocks[min(1, len(blocks) - 1)][1] if len(blocks) > 1 else blocks[0][1]
    d = group[len(group) // 2]
    return d.pixel_array.astype(np.float32), tuple(float(v) for v in d.PixelSpacing)


def main() -> None:
    """Generate, tile, write."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("png", type=Path)
    ap.add_argument("--preset", default="realistic", choices=list(PRESETS))
    ap.add_argument("--studies", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    cfg = load(SynthConfig, None, [*PRESETS[args.preset], f"studies={args.studies}", f"seed={args.seed}"])
    with tempfile.TemporaryDirectory() as tmp:
        generate(tmp, cfg, workers=1)
        series = pd.read_csv(Path(tmp) / "train_series_descriptions.csv")
        rows = []
        for sid, g in series.groupby("study_id", sort=False):
            tiles = []
            for desc in (SAGITTAL_T1, SAGITTAL_T2, AXIAL_T2):
                match = g[g.series_description == desc]
                if len(match):
                    img, sp = middle_slice(Path(tmp) / "train_images" / str(sid) / str(match.series_id.iloc[0]))
                    tiles.append(tile(img, sp))
                else:
                    tiles.append(np.zeros((TILE, TILE), np.uint8))
            rows.append(np.concatenate(tiles, axis=1))
    write_png(args.png, np.concatenate(rows, axis=0))
    print(f"wrote {args.png} ({args.png.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
