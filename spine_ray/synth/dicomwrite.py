"""Encode rendered slices as DICOM files that a strict reader accepts, byte-for-byte deterministic.

UIDs mirror the competition's de-identified files: StudyInstanceUID is the study id,
SeriesInstanceUID the series id, SOPInstanceUID `{study}.{series}.{instance}`, and one
FrameOfReferenceUID per study. Pixels are MONOCHROME2, 16 bits allocated, 12 stored, RLE
Lossless unless a quirk says otherwise.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    RLELossless,
    generate_uid,
)

from spine_ray.synth.geometry import SeriesGeometry, Slice

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
TRANSFER_SYNTAXES = {
    "rle": RLELossless,
    "explicit": ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
    "deflated": DeflatedExplicitVRLittleEndian,
}


@dataclass(frozen=True)
class SeriesHeader:
    """What every file of a series shares."""

    study_id: int
    series_id: int
    series_number: int
    description: str
    frame_of_reference: str
    geometry: SeriesGeometry
    transfer_syntax: str = "rle"
    monochrome1: bool = False
    rescale: tuple[float, float] | None = None  # (slope, intercept)


def frame_of_reference_uid(seed: int, study_id: int) -> str:
    """A deterministic FrameOfReferenceUID for one study."""
    return generate_uid(entropy_srcs=["spine-ray-synth", str(seed), str(study_id)])


def _ds(v: float) -> str:
    """A DS value that fits the 16-character limit."""
    return f"{v:.6g}"


def _base(header: SeriesHeader, instance: int, sop_class: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = f"{header.study_id}.{header.series_id}.{instance}"
    ds.StudyInstanceUID = str(header.study_id)
    ds.SeriesInstanceUID = str(header.series_id)
    ds.FrameOfReferenceUID = header.frame_of_reference
    ds.PatientID = str(header.study_id)
    ds.StudyID = str(header.study_id)[-8:]
    ds.SeriesNumber = header.series_number
    ds.SeriesDescription = header.description
    ds.InstanceNumber = instance
    return ds


def _to_bytes(ds: Dataset, syntax: str) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "SPINE_RAY_SYNTH"
    ds.file_meta = meta
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def image_bytes(header: SeriesHeader, s: Slice, pixels: np.ndarray, instance: int) -> bytes:
    """One MR image file for slice `s` with 12-bit `pixels` [rows, cols] (uint16, display values)."""
    ds = _base(header, instance, MRImageStorage)
    ds.Modality = "MR"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NORM"]
    ds.ImagePositionPatient = [_ds(v) for v in s.position]
    ds.ImageOrientationPatient = [_ds(v) for v in (*s.row_dir, *s.col_dir)]
    ds.PixelSpacing = [_ds(v) for v in s.spacing]
    ds.SliceThickness = _ds(header.geometry.thickness)
    ds.SpacingBetweenSlices = _ds(header.geometry.spacing_between)
    ds.SliceLocation = _ds(float(np.asarray(s.position) @ s.normal))
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    stored = pixels.astype(np.int64)
    if header.rescale is not None:
        slope, intercept = header.rescale
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = _ds(slope), _ds(intercept), "US"
        stored = np.rint((stored - intercept) / slope)
    if header.monochrome1:
        ds.PhotometricInterpretation = "MONOCHROME1"
        stored = 4095 - stored
    else:
        ds.PhotometricInterpretation = "MONOCHROME2"
    arr = np.clip(stored, 0, 4095).astype(np.uint16)
    ds.WindowCenter, ds.WindowWidth = _ds(float(np.median(arr))), _ds(float(max(arr.max() - arr.min(), 1)))
    syntax = TRANSFER_SYNTAXES[header.transfer_syntax]
    if syntax == RLELossless:
        ds.compress(RLELossless, arr, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    else:
        ds.PixelData = arr.tobytes()
    return _to_bytes(ds, syntax)


def non_image_bytes(header: SeriesHeader, instance: int) -> bytes:
    """A DICOM object without pixels (a Basic Text SR) that sits in a series folder."""
    ds = _base(header, instance, BASIC_TEXT_SR)
    ds.Modality = "SR"
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    return _to_bytes(ds, ExplicitVRLittleEndian)
