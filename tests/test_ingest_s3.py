"""`prepare` from S3 to S3 against a real (loopback moto) S3 server."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
from dicomfiles import truncate, write_study_tree

from spine_ray.core.storage import fs_for
from spine_ray.data import ingest
from spine_ray.data.volumes import load_volume, read_manifest, read_table, read_volumes


def test_s3_round_trip_matches_local(tmp_path, s3_bucket, ray_local):
    data = str(tmp_path / "data")
    write_study_tree(data, "test", [7, 8], rows=16, cols=20, slices=(3, 3, 4))
    series_dir = os.path.join(data, "test_images", "8", "81")
    truncate(os.path.join(series_dir, sorted(os.listdir(series_dir))[0]), 0.3)
    fs, bucket = fs_for(s3_bucket)
    fs.put(data + "/", f"{bucket}/data", recursive=True)
    fs.invalidate_cache()
    s3_out = f"{s3_bucket}/out"
    summary = ingest.prepare(f"{s3_bucket}/data", s3_out, "test", workers=2, shard_mb=0.001)
    local = ingest.prepare(data, str(tmp_path / "out"), "test", workers=2, shard_mb=0.001)
    assert summary.stacks == local.stacks == 8 and summary.errors == local.errors == 1
    assert read_manifest(s3_out)["files"]["labels"] is None  # test split: no labels
    a = read_volumes(s3_out).sort_values(["series_id", "stack"]).reset_index(drop=True)
    b = read_volumes(str(tmp_path / "out")).sort_values(["series_id", "stack"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(a.drop(columns="volume"), b.drop(columns="volume"))
    for i in range(len(a)):
        np.testing.assert_array_equal(load_volume(a.iloc[i])[0], load_volume(b.iloc[i])[0])
    err = read_table(s3_out, "errors.parquet")
    assert err["path"].iloc[0].startswith(f"{bucket}/data/test_images/8/81/")
    # Plain pandas reads the shards straight from S3 too.
    assert len(pd.read_parquet(f"{s3_out}/volumes")) == 8
    assert fs.exists(f"{bucket}/out/manifest.json")
