"""Checkpoints that cannot run code: weights-only loading, and a cheap check that reads only the pickle."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import pytest
import torch

from spine_ray.core.schema import SchemaError
from spine_ray.engine.train_loop import (
    UnsafeCheckpointError,
    check_checkpoint,
    load_state,
    save_state,
)


class _RunsCode:
    """Unpickling this calls os.system: what a poisoned checkpoint in a shared bucket would do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def poisoned(path: Path, marker: Path, zip_format: bool = True) -> None:
    """A model.pt with real-looking weights whose pickle would run a command when loaded unsafely."""
    payload = {"model": {"w": torch.zeros(2)}, "config": {}, "extra": _RunsCode(str(marker))}
    if zip_format:
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))


def test_a_training_state_round_trips_weights_only(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "scaler": torch.amp.GradScaler("cuda", enabled=False).state_dict(), "epoch": 3, "metrics": {"loss": 0.5}}
    save_state(state, str(tmp_path / "state.pt"))
    back = load_state(str(tmp_path / "state.pt"))
    assert back["epoch"] == 3 and torch.equal(back["model"]["weight"], model.state_dict()["weight"])
    check_checkpoint(str(tmp_path / "state.pt"))  # passes: nothing but tensors and plain data


@pytest.mark.parametrize("zip_format", [True, False])
def test_a_checkpoint_that_would_run_code_is_refused_and_nothing_runs(tmp_path, zip_format):
    marker = tmp_path / "ran"
    path = tmp_path / "model.pt"
    poisoned(path, marker, zip_format)
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        check_checkpoint(str(path))
    with pytest.raises(UnsafeCheckpointError, match="refused") as e:
        load_state(io.BytesIO(path.read_bytes()), what=str(path))
    assert isinstance(e.value, SchemaError) and str(path) in str(e.value)  # the CLI's one-line user error
    assert not marker.exists()
