"""Synthetic RSNA-2024-like datasets: a label model with a known ceiling, 3D phantoms, DICOM series."""
