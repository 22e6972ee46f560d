"""The per-fold training loop: plain PyTorch, no Ray.

`fit` trains one model on one fold: AdamW over the parameters that require grad (frozen ones,
and their batch-norm statistics, stay put), warm-up then cosine schedule, mixed precision on CUDA
(bf16, or fp16 with a grad scaler), gradient clipping, a checkpoint after every epoch through a
callback, resumption from a checkpoint state, and optionally the best epoch's weights by a
validation metric (`select`). Ray Train calls it from its workers
(`spine_ray.engine.worker`); tests and GPU checks call it directly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from spine_ray.core.schema import SchemaError
from spine_ray.models.freezing import eval_frozen_norms

Batch = Mapping[str, Any]
# A batch's last preparation on the training device, after the copy and before the step (e.g. augmentation).
OnDevice = Callable[[Batch], Batch]
# A step's loss and its named parts (device tensors, read once an epoch; plain numbers are accepted).
LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, dict[str, torch.Tensor | float]]]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of one fold's training."""

    epochs: int = 4
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-2
    warmup_frac: float = 0.1
    grad_clip: float = 5.0
    amp: bool = True  # only takes effect on CUDA
    amp_dtype: str = "bfloat16"  # or "float16" (uses a grad scaler)
    seed: int = 0
    # GPU speed-ups of the 2-D backbones (`models.backbone.speed_up`); no effect on CPU.
    channels_last: bool = False
    compile: bool = False  # torch.compile of each backbone, in place (falls back to eager where it fails)
    # With compile: the compiled kernels shared by the run's fold jobs through its storage
    # (`engine.compile_cache`: a network is compiled about once per run, not once per node).
    compile_cache: bool = True
    # cuDNN's autotuner for the process (torch.backends.cudnn.benchmark): each convolution shape's
    # algorithms are timed once and the fastest kept; the choice may differ from run to run.
    cudnn_benchmark: bool = False
    # The batch `lr` was tuned at (summed over a fold's data-parallel workers); 0: lr is used as given.
    # With it, a larger batch (more work per GPU step) trains at lr × rule(batch / lr_batch):
    # "sqrt", the square-root rule for Adam-type optimisers (Malladi et al. 2022, "On the SDEs and
    # scaling rules for adaptive gradient algorithms"), or "linear" (Goyal et al. 2017, for SGD).
    # Warm-up stays warmup_frac of the (fewer) steps.
    lr_batch: int = 0
    lr_rule: str = "sqrt"

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be ≥ 1")
        if not self.lr > 0:
            raise ValueError("lr must be > 0")
        if self.amp_dtype not in ("bfloat16", "float16"):
            raise ValueError("amp_dtype must be bfloat16 or float16")
        if self.lr_batch < 0 or self.lr_rule not in ("sqrt", "linear"):
            raise ValueError(f"lr_batch must be ≥ 0 and lr_rule sqrt or linear, not {self.lr_batch}, {self.lr_rule!r}")

    def scaled_lr(self, world: int = 1) -> float:
        """The learning rate at this config's batch on `world` data-parallel workers (`lr_batch`, `lr_rule`)."""
        if not self.lr_batch:
            return self.lr
        ratio = self.batch_size * world / self.lr_batch
        return self.lr * (math.sqrt(ratio) if self.lr_rule == "sqrt" else ratio)


# Where `TrainConfig.amp` takes effect (tests add "cpu" to run the reduced-precision paths on a CPU).
AMP_DEVICES: tuple[str, ...] = ("cuda",)


def precision(cfg: TrainConfig, device: torch.device) -> AbstractContextManager:
    """The autocast a member trains in on `device`, and predicts in (validation, OOF, inference): `cfg.amp_dtype` where
    `cfg.amp` takes effect, else none (float32)."""
    if not (cfg.amp and device.type in AMP_DEVICES):
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if cfg.amp_dtype == "bfloat16" else torch.float16)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0 at `total` steps."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class EpochResult:
    """What one epoch produced: metrics and a checkpoint state to persist."""

    epoch: int
    metrics: dict[str, float]
    state: dict[str, Any]


def _to_device(batch: Batch, device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


@dataclass
class _Optim:
    """The optimiser, its schedule and the grad scaler of one training step (`fit`)."""

    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    params: list[nn.Parameter]
    autocast: Callable[[], Any]

    @classmethod
    def build(cls, model: nn.Module, cfg: TrainConfig, steps_per_epoch: int, device: torch.device, world: int = 1) -> _Optim:
        """AdamW (fused on CUDA) at `cfg.scaled_lr(world)` over the trainable parameters, warm-up + cosine, AMP on CUDA."""
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("fit: every parameter is frozen, nothing to train")
        opt = torch.optim.AdamW(params, lr=cfg.scaled_lr(world), weight_decay=cfg.weight_decay, fused=device.type == "cuda")
        total = cfg.epochs * max(1, steps_per_epoch)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, int(cfg.warmup_frac * total)))
        use_amp = cfg.amp and device.type in AMP_DEVICES
        scaler = torch.amp.GradScaler("cuda", enabled=use_amp and cfg.amp_dtype == "float16")
        return cls(opt, sched, scaler, params, lambda: precision(cfg, device))

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of it."""
        return {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(), "scaler": self.scaler.state_dict()}

    def load(self, state: dict[str, Any]) -> None:
        """Resume from a checkpoint state."""
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])


def _train_epoch(
    model: nn.Module, loss_fn: LossFn, batches: Iterable[Batch], o: _Optim, cfg: TrainConfig, device: torch.device, on_device: OnDevice | None = None
) -> dict[str, float]:
    """One epoch of optimiser steps; returns the mean loss parts, throughput and the share of time spent waiting for data.

    Loss parts stay device tensors, read once at the end of the epoch: a host sync per step would
    stall a GPU's queue every step.
    """
    model.train()
    eval_frozen_norms(model)
    t0, seen, wait = time.perf_counter(), 0, 0.0
    parts_seen: dict[str, list[torch.Tensor]] = {}
    stream = iter(batches)
    while True:
        # data_wait_frac: the share of the epoch spent waiting for the next batch (the input
        # pipeline is the bottleneck when this is large; on CUDA the step itself is asynchronous).
        t = time.perf_counter()
        batch = next(stream, None)
        wait += time.perf_counter() - t
        if batch is None:
            break
        batch = _to_device(batch, device)
        if on_device is not None:
            batch = on_device(batch)  # outside autocast: the stage decides its own precision
        with o.autocast():
            loss, parts = loss_fn(model, batch)
        o.opt.zero_grad(set_to_none=True)
        o.scaler.scale(loss).backward()
        if cfg.grad_clip > 0:
            o.scaler.unscale_(o.opt)
            nn.utils.clip_grad_norm_(o.params, cfg.grad_clip)
        o.scaler.step(o.opt)
        o.scaler.update()
        o.sched.step()
        seen += _batch_len(batch)
        for k, v in {"loss": loss, **parts}.items():
            parts_seen.setdefault(k, []).append(torch.as_tensor(v).detach().float().reshape(()))
    elapsed = time.perf_counter() - t0
    means = {f"train_{k}": float(torch.stack(v).double().mean()) for k, v in parts_seen.items()}  # the epoch's one host sync
    return {**means, "samples_per_s": seen / max(elapsed, 1e-9), "data_wait_frac": wait / max(elapsed, 1e-9)}


def fit(
    model: nn.Module,
    loss_fn: LossFn,
    train_batches: Callable[[int], Iterable[Batch]],
    steps_per_epoch: int,
    cfg: TrainConfig,
    *,
    validate: Callable[[nn.Module], dict[str, float]] | None = None,
    on_epoch_end: Callable[[EpochResult], None] | None = None,
    resume: dict[str, Any] | None = None,
    device: torch.device | None = None,
    select: str | None = None,
    on_device: OnDevice | None = None,
    world: int = 1,
) -> dict[str, float]:
    """Train for cfg.epochs; returns the last epoch's metrics.

    train_batches(epoch) yields batches (dicts of tensors) for that epoch; `steps_per_epoch` sizes
    the schedule. `resume` is a state previously passed to on_epoch_end. `select` (e.g. "val_auc"):
    when `validate` reports it, the model ends with the weights of the epoch where it was highest
    (kept in the checkpoint state, so a resumed run selects the same); otherwise the last epoch's.
    `on_device(batch)`, when given, finishes each batch once it is on the device (before autocast).
    `world`: the data-parallel workers whose batches make one step (the learning rate's batch rule).
    """
    device = device or next(model.parameters()).device
    torch.manual_seed(cfg.seed)
    model.to(device)
    o = _Optim.build(model, cfg, steps_per_epoch, device, world)
    raw = getattr(model, "module", model)  # the bare model under DistributedDataParallel
    start = 0
    if resume is not None:
        raw.load_state_dict(resume["model"])
        o.load(resume)
        start = int(resume["epoch"]) + 1
    metrics: dict[str, float] = dict(resume.get("metrics", {})) if resume else {}
    best: dict[str, Any] | None = resume.get("best") if resume else None  # {"value", "epoch", "model"}
    for epoch in range(start, cfg.epochs):
        metrics = {**_train_epoch(model, loss_fn, train_batches(epoch), o, cfg, device, on_device), "epoch": epoch, "lr": o.opt.param_groups[0]["lr"]}
        if validate is not None:
            model.eval()
            with torch.no_grad():
                metrics.update({f"val_{k}": v for k, v in validate(raw).items()})  # the bare model: no DDP collectives
        if not all(np.isfinite(v) for v in metrics.values() if isinstance(v, float)):
            raise FloatingPointError(f"non-finite metrics at epoch {epoch}: {metrics}")
        if select is not None and select in metrics and (best is None or metrics[select] > best["value"]):
            best = {"value": float(metrics[select]), "epoch": epoch, "model": _snapshot(raw.state_dict())}
        if on_epoch_end is not None:
            state = {"model": raw.state_dict(), **o.state(), "epoch": epoch, "metrics": metrics, **({"best": best} if best is not None else {})}
            on_epoch_end(EpochResult(epoch, metrics, _snapshot(state)))
    if best is not None:
        raw.load_state_dict(best["model"])
        metrics = {**metrics, "selected_epoch": best["epoch"], f"selected_{select}": best["value"]}
    return metrics


def _snapshot(obj: Any) -> Any:
    """A CPU copy of a (nested) state: state_dict() tensors alias the live parameters."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _snapshot(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_snapshot(v) for v in obj)
    return obj


def _batch_len(batch: Batch) -> int:
    for v in batch.values():
        if isinstance(v, torch.Tensor) and v.ndim > 0:
            return int(v.shape[0])
    return 0


class UnsafeCheckpointError(SchemaError):
    """A checkpoint that is not plain tensors and containers: loading it could run code."""


def save_state(state: dict[str, Any], path: str | Any) -> None:
    """Save a checkpoint state (tensors, numbers, strings and containers only) with torch.save (to a path or a binary file)."""
    torch.save(state, path)


def load_state(path: str | Any, what: str | None = None) -> dict[str, Any]:
    """Load a checkpoint onto the CPU, refusing any pickle that holds more than tensors and plain data.

    `weights_only=True` never runs code from the file: a checkpoint from a shared bucket can be
    trusted as far as its numbers go. `path` may be an open binary file; `what` names it in errors.
    """
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsafeCheckpointError(str(what or path), f"refused, not a weights-only checkpoint ({first})") from None


def check_checkpoint(url: str) -> None:
    """Refuse a checkpoint (path or URL) whose pickle names anything but tensors and plain data,
    reading only its pickle, not its tensors: a cheap check before workers load it."""
    from spine_ray.core.storage import fs_for

    fs, path = fs_for(url)
    try:
        with fs.open(path, "rb") as f:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(f)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - anything that is not a torch.save zip is refused
        raise UnsafeCheckpointError(url, f"refused, not a torch.save checkpoint ({type(e).__name__})") from None
    if unsafe:
        raise UnsafeCheckpointError(url, f"refused, not a weights-only checkpoint (it would import {', '.join(sorted(unsafe)[:3])})")
