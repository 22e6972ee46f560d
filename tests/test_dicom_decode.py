"""Decoding and stacking: every case the real data (and broken copies of it) can throw at us."""

from __future__ import annotations

import os

import numpy as np
import pydicom
import pytest
from dicomfiles import (
    axial,
    make_dataset,
    phantom,
    sagittal,
    truncate,
    write_non_image,
    write_series,
)
from pydicom.uid import RLELossless

from spine_ray.data import dicom, geometry

H, W = 24, 32  # non-square images catch rows/columns swaps


def _vol(n: int, seed: int = 0) -> np.ndarray:
    return phantom(n, H, W, seed=seed)


@pytest.mark.parametrize("compress", [True, False])
def test_shuffled_instances_are_sorted_along_the_normal(tmp_path, compress):
    vol = _vol(6)
    g = sagittal(6, pixel_spacing=(0.5, 0.8), step=3.0)
    numbers = [5036, 5031, 5040, 5033, 5039, 5032]  # not from 1, not spatial order
    write_series(str(tmp_path), vol, g, numbers, compress=compress)
    res = dicom.decode_series(sorted(str(p) for p in tmp_path.iterdir()))
    assert res.errors == []
    (s,) = res.stacks
    assert s.volume.dtype == np.uint16 and s.volume.shape == (6, H, W)
    np.testing.assert_array_equal(s.volume, vol)
    assert s.instance_numbers == numbers
    np.testing.assert_allclose(s.positions, g.positions, atol=1e-5)
    assert s.pixel_spacing == (0.5, 0.8)
    assert s.slice_spacing == pytest.approx(3.0, abs=1e-5)
    np.testing.assert_allclose(s.affine, geometry.affine(g.positions, g.orientation, (0.5, 0.8)), atol=1e-5)


def test_positions_opposite_to_instance_order(tmp_path):
    vol = _vol(5)
    g = axial(5, step=4.0)
    write_series(str(tmp_path), vol[::-1], type(g)(g.positions[::-1], g.orientation, g.pixel_spacing))
    (s,) = dicom.decode_series([str(p) for p in tmp_path.iterdir()]).stacks
    np.testing.assert_array_equal(s.volume, vol)
    assert s.instance_numbers == [5, 4, 3, 2, 1]
    assert np.all(np.diff(geometry.slice_distances(s.positions, s.orientation)) > 0)


def test_bytes_sources_decode_like_paths(tmp_path):
    paths = write_series(str(tmp_path), _vol(3), axial(3))
    a = dicom.decode_series(paths).stacks[0]
    b = dicom.decode_series([(os.path.basename(p), open(p, "rb").read()) for p in paths]).stacks[0]
    np.testing.assert_array_equal(a.volume, b.volume)
    assert b.names == ["1.dcm", "2.dcm", "3.dcm"]


def test_oblique_axial_blocks_become_one_stack_each(tmp_path):
    vol = _vol(9)
    frame = "1.2.3.4"
    write_series(str(tmp_path), vol[:4], axial(4, tilt_deg=-12.0, origin=(0, 0, -40.0)), [1, 2, 3, 4], frame_uid=frame)
    write_series(str(tmp_path), vol[4:], axial(5, tilt_deg=9.0, origin=(0, 0, 0.0)), [5, 6, 7, 8, 9], frame_uid=frame)
    res = dicom.decode_series([str(p) for p in tmp_path.iterdir()])
    assert [s.volume.shape[0] for s in res.stacks] == [4, 5]
    np.testing.assert_array_equal(res.stacks[0].volume, vol[:4])
    np.testing.assert_array_equal(res.stacks[1].volume, vol[4:])
    assert geometry.orientation_angle(res.stacks[0].orientation, res.stacks[1].orientation) == pytest.approx(21.0, abs=1e-3)


def test_parallel_blocks_are_split_at_a_position_gap(tmp_path):
    vol = _vol(8)
    write_series(str(tmp_path), vol[:4], axial(4, origin=(0, 0, -60.0), step=4.0), [1, 2, 3, 4], frame_uid="1.2")
    write_series(str(tmp_path), vol[4:], axial(4, origin=(0, 0, 0.0), step=4.0), [5, 6, 7, 8], frame_uid="1.2")
    res = dicom.decode_series([str(p) for p in tmp_path.iterdir()])
    assert [s.instance_numbers for s in res.stacks] == [[1, 2, 3, 4], [5, 6, 7, 8]]


def test_tiny_tilt_stays_one_stack(tmp_path):
    vol = _vol(4)
    g = axial(4)
    for k in range(4):  # jitter orientation by < 1 degree per slice
        gk = axial(1, tilt_deg=0.3 * (k % 2), origin=tuple(g.positions[k]))
        write_series(str(tmp_path), vol[k : k + 1], gk, [k + 1], frame_uid="1.2", series_uid="1.3")
    assert len(dicom.decode_series([str(p) for p in tmp_path.iterdir()]).stacks) == 1


def test_different_frames_of_reference_split(tmp_path):
    write_series(str(tmp_path / "a"), _vol(3), axial(3), [1, 2, 3], frame_uid="1.1")
    write_series(str(tmp_path / "b"), _vol(3), axial(3, origin=(0, 0, 12.0)), [4, 5, 6], frame_uid="1.2")
    files = [str(p) for d in ("a", "b") for p in (tmp_path / d).iterdir()]
    assert len(dicom.decode_series(files).stacks) == 2


def test_monochrome1_is_inverted(tmp_path):
    vol = _vol(2)
    write_series(str(tmp_path), 4095 - vol, axial(2), photometric="MONOCHROME1", bits_stored=12)
    (s,) = dicom.decode_series([str(p) for p in tmp_path.iterdir()]).stacks
    np.testing.assert_array_equal(s.volume, vol)


def test_rescale_slope_intercept(tmp_path):
    vol = _vol(2)
    write_series(str(tmp_path), vol, axial(2), slope=2.0, intercept=-1024.0)
    (s,) = dicom.decode_series([str(p) for p in tmp_path.iterdir()]).stacks
    expected = vol.astype(np.int32) * 2 - 1024
    assert s.volume.dtype == np.int16
    np.testing.assert_array_equal(s.volume, expected)


@pytest.mark.parametrize("compress", [True, False])
def test_signed_pixels(tmp_path, compress):
    vol = _vol(2).astype(np.int16) - 2048  # 12-bit signed range
    write_series(str(tmp_path), vol, axial(2), signed=True, compress=compress)
    (s,) = dicom.decode_series([str(p) for p in tmp_path.iterdir()]).stacks
    assert s.volume.dtype == np.int16
    np.testing.assert_array_equal(s.volume, vol)


def test_signed_12_bit_without_sign_extension_in_the_file(tmp_path):
    vol = np.array([[-2048, -1, 0, 2047]], dtype=np.int16)
    stored = (vol.astype(np.int32) & 0xFFF).astype(np.uint16)  # high 4 bits zero, as some writers do
    g = axial(1, pixel_spacing=(1.0, 1.0))
    ds = make_dataset(vol, g.positions[0], g.orientation, g.pixel_spacing, 1, "1.2", "1.3", signed=True, raw_bytes=stored.tobytes())
    ds.save_as(str(tmp_path / "1.dcm"), enforce_file_format=True)
    (s,) = dicom.decode_series([str(tmp_path / "1.dcm")]).stacks
    np.testing.assert_array_equal(s.volume[0], vol)


@pytest.mark.parametrize("compress", [True, False])
def test_bits_above_bits_stored_are_masked(tmp_path, compress):
    vol = np.array([[0, 1, 4095, 100]], dtype=np.uint16)
    stored = vol | 0xF000  # garbage in the unused high bits
    g = axial(1, pixel_spacing=(1.0, 1.0))
    ds = make_dataset(vol, g.positions[0], g.orientation, g.pixel_spacing, 1, "1.2", "1.3", raw_bytes=stored.tobytes())
    if compress:  # RLE frames decode into a fresh buffer that is masked in place
        ds.BitsStored, ds.HighBit = 16, 15  # pydicom's encoder refuses values above BitsStored
        ds.compress(RLELossless, stored)
        ds.BitsStored, ds.HighBit = 12, 11
    ds.save_as(str(tmp_path / "1.dcm"), enforce_file_format=True)
    (s,) = dicom.decode_series([str(tmp_path / "1.dcm")]).stacks
    np.testing.assert_array_equal(s.volume[0], vol)


@pytest.mark.parametrize("keep", [0.02, 0.2, 0.5, 0.9, 0.99])
def test_truncated_file_is_an_error_and_the_rest_survives(tmp_path, keep):
    vol = _vol(5)
    paths = write_series(str(tmp_path), vol, axial(5))
    truncate(paths[2], keep)
    res = dicom.decode_series(paths)
    assert [os.path.basename(n) for n, _ in res.errors] == ["3.dcm"]
    # The hole left by the bad slice splits nothing here (one missing slice < 2x median step).
    assert [s.instance_numbers for s in res.stacks] == [[1, 2, 4, 5]]
    np.testing.assert_array_equal(res.stacks[0].volume, vol[[0, 1, 3, 4]])


def test_empty_dataset_from_a_truncated_compressed_stream(tmp_path):
    paths = write_series(str(tmp_path), _vol(1), axial(1))
    data = open(paths[0], "rb").read()
    with open(paths[0], "wb") as f:  # the preamble and magic only: pydicom returns an empty dataset
        f.write(data[:132])
    res = dicom.decode_series(paths)
    assert res.stacks == [] and len(res.errors) == 1


def test_missing_geometry_tags(tmp_path):
    paths = write_series(str(tmp_path), _vol(3), axial(3))
    import pydicom

    ds = pydicom.dcmread(paths[1])
    del ds.ImageOrientationPatient
    ds.save_as(paths[1])
    res = dicom.decode_series(paths)
    assert res.errors == [(paths[1], "missing ImageOrientationPatient")]
    assert res.stacks[0].instance_numbers == [1, 3]


def test_mixed_sizes_reject_the_odd_file(tmp_path):
    g = axial(4)
    write_series(str(tmp_path), _vol(3), type(g)(g.positions[:3], g.orientation, g.pixel_spacing), [1, 2, 3], frame_uid="1.2")
    write_series(str(tmp_path / "x"), phantom(1, H + 8, W, seed=3), type(g)(g.positions[3:], g.orientation, g.pixel_spacing), [4], frame_uid="1.2")
    files = [str(p) for p in tmp_path.glob("*.dcm")] + [str(tmp_path / "x" / "4.dcm")]
    res = dicom.decode_series(files)
    assert [s.instance_numbers for s in res.stacks] == [[1, 2, 3]]
    assert len(res.errors) == 1 and res.errors[0][1].startswith("mixed sizes")


def test_non_images_and_localizers_are_dropped(tmp_path):
    paths = write_series(str(tmp_path), _vol(3), axial(3))
    sr = write_non_image(str(tmp_path / "sr.dcm"))
    loc = write_series(str(tmp_path / "loc"), _vol(1), sagittal(1), [77], image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    junk = str(tmp_path / "junk.dcm")
    with open(junk, "wb") as f:
        f.write(os.urandom(600))
    res = dicom.decode_series([*paths, sr, *loc, junk])
    assert res.stacks[0].instance_numbers == [1, 2, 3]
    reasons = dict(res.errors)
    assert reasons[sr].startswith("not an image")
    assert reasons[loc[0]] == "localizer image"
    assert reasons[junk].startswith("unreadable DICOM")


def test_series_with_no_usable_image(tmp_path):
    sr = write_non_image(str(tmp_path / "1.dcm"))
    res = dicom.decode_series([sr])
    assert res.stacks == [] and len(res.errors) == 1


def _file_header(path: str) -> dicom.Header:
    return dicom.header_from_dataset(pydicom.dcmread(path, stop_before_pixels=True), path)


def test_header_of_a_file_read_without_its_pixels(tmp_path):
    (p,) = write_series(str(tmp_path), _vol(1), sagittal(1, pixel_spacing=(0.5, 0.8)), [5031])
    h = _file_header(p)
    assert (h.instance_number, h.rows, h.cols, h.pixel_spacing) == (5031, H, W, (0.5, 0.8))
    assert h.transfer_syntax == "1.2.840.10008.1.2.5"


def test_header_from_an_in_memory_dataset_matches_the_file(tmp_path):
    g = sagittal(1, pixel_spacing=(0.5, 0.8))
    ds = make_dataset(_vol(1)[0], g.positions[0], g.orientation, g.pixel_spacing, 7, "1.2", "1.3", slope=1.5, intercept=-3.0)
    ds.save_as(str(tmp_path / "7.dcm"), enforce_file_format=True)
    from_file = _file_header(str(tmp_path / "7.dcm"))
    in_memory = dicom.header_from_dataset(ds, str(tmp_path / "7.dcm"))  # converted, not raw, elements
    assert in_memory == from_file
    assert (from_file.slope, from_file.intercept, from_file.slice_thickness) == (1.5, -3.0, 3.5)


def test_intensity_percentiles_match_numpy():
    from spine_ray.data.volumes import intensity_percentiles

    rng = np.random.default_rng(0)
    for vol in (rng.integers(0, 4096, (3, 20, 30)).astype(np.uint16), rng.integers(-2000, 900, (2, 16, 16)).astype(np.int16)):
        expected = np.percentile(vol[:, ::2, ::2], [1, 99], method="inverted_cdf")
        assert intensity_percentiles(vol) == pytest.approx(tuple(expected))


def test_duplicate_positions_keep_one_slice(tmp_path):
    vol = _vol(3)
    g = axial(3)
    write_series(str(tmp_path), vol, g, [1, 2, 3], frame_uid="1.2", series_uid="1.3")
    write_series(str(tmp_path / "dup"), vol[1:2], type(g)(g.positions[1:2], g.orientation, g.pixel_spacing), [9], frame_uid="1.2", series_uid="1.3")
    res = dicom.decode_series([*(str(p) for p in tmp_path.glob("*.dcm")), str(tmp_path / "dup" / "9.dcm")])
    assert res.stacks[0].instance_numbers == [1, 2, 3]
    assert len(res.errors) == 1 and res.errors[0][1].startswith("duplicate slice position")


def test_other_transfer_syntaxes_go_through_pydicom(tmp_path):
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    vol = _vol(2)
    g = axial(2)
    for k in range(2):
        ds = make_dataset(vol[k], g.positions[k], g.orientation, g.pixel_spacing, k + 1, "1.2", "1.3", compress=False)
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        ds.save_as(str(tmp_path / f"{k + 1}.dcm"), enforce_file_format=True)
    assert _file_header(str(tmp_path / "1.dcm")).transfer_syntax == DeflatedExplicitVRLittleEndian
    (s,) = dicom.decode_series([str(p) for p in tmp_path.iterdir()]).stacks
    np.testing.assert_array_equal(s.volume, vol)


def test_corrupted_bytes_never_raise(tmp_path):
    paths = write_series(str(tmp_path), _vol(2), axial(2))
    good = open(paths[0], "rb").read()
    rng = np.random.default_rng(0)
    pixels_start = good.rfind(b"\xe0\x7f\x10\x00")  # (7FE0,0010) Pixel Data
    for trial in range(300):
        bad = bytearray(good)
        lo = pixels_start if trial % 2 else 0  # half of the trials hit the RLE stream itself
        at = rng.integers(lo, len(bad), size=int(rng.integers(1, 8)))
        for i in at:
            bad[i] = int(rng.integers(0, 256))
        res = dicom.decode_series([("bad.dcm", bytes(bad)), (paths[1], open(paths[1], "rb").read())])
        assert paths[1] in {n for s in res.stacks for n in s.names}
        assert len(res.errors) <= 1
