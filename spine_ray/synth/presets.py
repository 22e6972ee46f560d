"""The synthetic dataset's presets: named sets of config overrides (no DICOM writer, so importable without pydicom)."""

from __future__ import annotations

from spine_ray.core.config import load
from spine_ray.synth.acquisition import AcquisitionConfig

PRESETS: dict[str, tuple[str, ...]] = {
    # The phantom of flat shapes at 256 px: fast, for tests.
    "simple": (),
    # Anatomy, mechanisms of narrowing, scanner variety and reader-like coordinates at 384–640 px.
    "realistic": (
        "preset=realistic",
        "acquisition.image_sizes=[384,448,512,640]",
        "acquisition.sagittal_fov_mm=[260.0,320.0]",
        "acquisition.axial_fov_mm=[160.0,220.0]",
        "acquisition.sagittal_centre_sd_mm=15.0",
    ),
}


def preset_acquisition(preset: str) -> AcquisitionConfig:
    """The acquisition a preset goes with (its `acquisition.*` overrides on the defaults)."""
    prefix = "acquisition."
    return load(AcquisitionConfig, None, [o.removeprefix(prefix) for o in PRESETS[preset] if o.startswith(prefix)])


__all__ = ["PRESETS", "preset_acquisition"]
