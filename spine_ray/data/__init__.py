"""DICOM in, geometry-correct volumes out: decoding, patient-space geometry, the prepared volume
tables (Ray Data ingest), millimetre-sized crops and resampling, array transforms, label flags.

Flow: `spine-ray prepare` (ingest) → `volumes/` Parquet shards + `labels.parquet`."""
