"""What gradient checkpointing costs the recipe's one-stage member, and the memory it saves: on CPU, in one run (issue 28).

`jobs/rsna2024.yaml`'s one-stage member runs both sagittal views per step (2 × 24 slices × 256²
a study, batch 4) through ConvNeXt-S encoders. With `grad_checkpointing` the encoder keeps only
each stage's input and runs its forward again during backward: the same gradients (dropout and
drop-path replay the same random numbers), more compute, less memory. On a 24 GB card that is
the price of fitting; the H200 held this unit in 10.6 GiB of 139 with it on.

For the member as the recipe builds it (`pretrained=False`), bf16 autocast as on the GPU:
  - the bytes autograd keeps for backward (`torch.autograd.graph.saved_tensors_hooks`, each storage
    once, parameters not counted) with and without checkpointing, at two slice counts, fitted as
    a + b × images and taken to the recipe's batch (4 studies × 2 views × 24 slices), to which the
    H200's measured peak (with checkpointing) adds the difference: the peak to expect without;
  - a training step's floating-point operations (forward, loss, backward; `torch.utils.flop_counter`,
    which sees the forward run again inside backward) with and without: what the GPU's time follows
    for a compute-bound ConvNeXt;
  - its time on this CPU, median of `--reps`, alternating; the baseline is checkpointing on, as the
    recipe has it. On CPU the step without checkpointing also pays the kernel's page faults for its
    larger activations (glibc hands big blocks back each step; CUDA's caching allocator does not),
    so the time here understates what the GPU gains; the FLOPs ratio is the figure to plan with.
Gradients with and without are compared too, in float32 (they must agree: the switch changes memory
and time, not the model).

    PYTHONPATH=. python benchmarks/checkpointing.py
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from benchmarks.train_switches import stack_rows, timed  # noqa: E402
from spine_ray.core.config import load  # noqa: E402
from spine_ray.engine.stage import FoldJob  # noqa: E402
from spine_ray.run_config import PipelineConfig  # noqa: E402
from spine_ray.stages.onestage import TARGETS, VIEW_NAMES, OneStageConfig, OneStageStage  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "jobs" / "rsna2024.yaml"
H200_PEAK_GIB = 10.6  # the one-stage unit's peak in `fit` on the H200, checkpointing on (the GPU-throughput issue)


def member(path: Path, slices: int, size: int, checkpointing: bool, backbone: str = "") -> OneStageConfig:
    """The recipe's first one-stage member, untrained weights, at `slices` × `size`², checkpointing as asked (another backbone: tests)."""
    cfg = load(PipelineConfig, str(path)).onestage[0]
    net = dataclasses.replace(cfg.model.net, pretrained=False, grad_checkpointing=checkpointing, backbone=backbone or cfg.model.net.backbone)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, net=net), slices=slices, size=size)


def batch(cfg: OneStageConfig, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """n random studies collated as training does (augmented, both views)."""
    rng = np.random.default_rng(seed)
    rows: dict[str, object] = {"study_id": np.arange(n), "labels": [rng.integers(0, 3, len(TARGETS)).astype(np.int8).tobytes() for _ in range(n)]}
    for v in VIEW_NAMES:
        r = stack_rows(v, cfg.view, n, rng)
        rows |= {f"x_{v}": r["x"], f"coords_{v}": r["coords"], f"visible_{v}": r["visible"], f"has_{v}": np.ones(n, bool)}
    stage = OneStageStage()
    job = FoldJob("onestage", cfg.name, 0, 5, cfg, "", "", {})
    return stage.to_batch(job, stage.augment(job, rows, rng))


def step(cfg: OneStageConfig, model: torch.nn.Module, b: dict[str, torch.Tensor], bf16: bool = True) -> None:
    """Forward and loss under bf16 autocast (or float32), then backward (gradients accumulate; callers zero them)."""
    job = FoldJob("onestage", cfg.name, 0, 5, cfg, "", "", {})
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss, _ = OneStageStage().loss(job, model, b)
    loss.backward()


FORWARD_OPS = ("aten.convolution", "aten.addmm", "aten.bmm")  # what the forward dispatches (backward: *_backward, mm)


def forward_flops(cfg: OneStageConfig, model: torch.nn.Module, b: dict[str, torch.Tensor], train: bool) -> float:
    """Forward-kind FLOPs of the loss (`train`: inside a whole training step, where checkpointing runs the forward again).

    Only forward kinds are counted: torch's counter prices a grouped convolution's backward as a
    dense one (97× too much for ConvNeXt's depthwise 7×7 at 96 channels), so a step is priced as
    3 forwards (forward, and a backward of about twice its work) plus what is recomputed.
    """
    from torch.utils.flop_counter import FlopCounterMode

    model.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as counter:
        if train:
            step(cfg, model, b)
        else:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                OneStageStage().loss(FoldJob("onestage", cfg.name, 0, 5, cfg, "", "", {}), model, b)
    model.zero_grad(set_to_none=True)
    counts = counter.get_flop_counts()["Global"]
    return float(sum(v for k, v in counts.items() if str(k) in FORWARD_OPS))


def forward_encoder(cfg: OneStageConfig, model: torch.nn.Module, b: dict[str, torch.Tensor]) -> dict[str, float]:
    """Forward FLOPs of each view's 2-D encoder on that view's slices (the part checkpointing runs twice)."""
    from torch.utils.flop_counter import FlopCounterMode

    out = {}
    for v in VIEW_NAMES:
        x = b[f"x_{v}"].flatten(0, 1)  # [B × S, 1, H, W]
        with FlopCounterMode(display=False) as counter, torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model.views[v].net.encoder(x)
        out[v] = float(counter.get_total_flops())
    return out


def saved_bytes(cfg: OneStageConfig, model: torch.nn.Module, b: dict[str, torch.Tensor]) -> int:
    """Bytes autograd keeps from the forward for the backward: every saved storage once, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    job = FoldJob("onestage", cfg.name, 0, 5, cfg, "", "", {})
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = OneStageStage().loss(job, model, b)
    del loss
    return sum(seen.values())


def models(path: Path, slices: int, size: int, backbone: str = "") -> dict[str, tuple[OneStageConfig, torch.nn.Module]]:
    """The member with checkpointing on and off, the same initial weights, in train mode."""
    out = {}
    for name, on in (("checkpointing on", True), ("checkpointing off", False)):
        cfg = member(path, slices, size, on, backbone)
        torch.manual_seed(0)
        model = OneStageStage().build_model(cfg.name, cfg)
        out[name] = (cfg, model.train())
    return out


def same_gradients(pair: dict[str, tuple[OneStageConfig, torch.nn.Module]], b: dict[str, torch.Tensor]) -> float:
    """Largest |difference| of any gradient between the two (the same seed for dropout and drop-path in both), in float32:
    this CPU's bf16 3-D convolution backward is not deterministic from one call to the next (seen at 2 slices)."""
    grads = []
    for cfg, model in pair.values():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        step(cfg, model, b, bf16=False)
        grads.append([p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()])
        model.zero_grad(set_to_none=True)
    return max(float((a - c).abs().max()) for a, c in zip(*grads, strict=True))


def main() -> None:
    """Print the saved bytes, the expected peak at the recipe's batch, the step times and their ratio."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=str(RECIPE))
    ap.add_argument("--px", type=int, default=0, help="in-plane size (default: the recipe's)")
    ap.add_argument("--slices", type=int, default=8, help="slices per view for the timing")
    ap.add_argument("--batch", type=int, default=1, help="studies per timed step")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = load(PipelineConfig, args.recipe).onestage[0]
    px = args.px or recipe.size
    full = recipe.train.batch_size * len(VIEW_NAMES) * recipe.slices  # images a recipe step encodes

    print(f"{recipe.name}: {recipe.model.net.backbone}, {px}² px, bf16 autocast, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("bytes kept for backward (one study, both views), and at the recipe's batch "
          f"({recipe.train.batch_size} × {len(VIEW_NAMES)} views × {recipe.slices} slices = {full} images):")
    sizes = (4, 8)
    kept: dict[str, list[int]] = {"checkpointing on": [], "checkpointing off": []}
    for s in sizes:
        for name, (cfg, model) in models(Path(args.recipe), s, px).items():
            kept[name].append(saved_bytes(cfg, model, batch(cfg, 1)))
    fits: dict[str, tuple[float, float]] = {}
    for name, got in kept.items():
        per = (got[1] - got[0]) / (len(VIEW_NAMES) * (sizes[1] - sizes[0]))  # bytes per image
        fits[name] = (got[0] - per * len(VIEW_NAMES) * sizes[0], per)
        print(f"  {name:<18} {got[0] / 2**20:8.1f} MiB at {sizes[0]} slices, {got[1] / 2**20:8.1f} MiB at {sizes[1]}: "
              f"{per / 2**20:6.2f} MiB an image → {(fits[name][0] + per * full) / 2**30:6.2f} GiB at the recipe's batch")
    extra = (fits["checkpointing off"][1] - fits["checkpointing on"][1]) * full / 2**30
    print(f"  without checkpointing: {extra:.1f} GiB more; the H200's {H200_PEAK_GIB} GiB peak with it → ≈ {H200_PEAK_GIB + extra:.1f} GiB "
          "(H100 80 GB: 79 GiB; H200: 139 GiB; A10G: 22 GiB)")

    pair = models(Path(args.recipe), args.slices, px)
    b = batch(pair["checkpointing on"][0], args.batch)
    diff = same_gradients(pair, b)
    print(f"gradients with and without, largest difference: {diff:.2e}")
    cfg, model = pair["checkpointing off"]
    fwd = forward_flops(cfg, model, b, train=False)
    enc = sum(forward_encoder(cfg, model, b).values())
    again = forward_flops(*pair["checkpointing on"], b, train=True) - forward_flops(cfg, model, b, train=True)
    print(f"FLOPs a step, {args.batch} × {len(VIEW_NAMES)} views × {args.slices} slices × {px}²: forward {fwd / 1e9:.1f} G "
          f"(the 2-D encoders {enc / fwd:.0%}), recomputed in backward with checkpointing {again / 1e9:.1f} G; "
          f"step ≈ 3 forwards: on / off ≈ {(3 * fwd + again) / (3 * fwd):.2f}×")

    def run(name: str) -> Callable[[], None]:
        cfg, model = pair[name]

        def go() -> None:
            model.zero_grad(set_to_none=True)
            step(cfg, model, b)

        return go

    t = timed({name: run(name) for name in pair}, args.reps)
    on, off = t["checkpointing on"], t["checkpointing off"]
    print(f"training step, {args.batch} × {len(VIEW_NAMES)} views × {args.slices} slices × {px}², median of {args.reps}:")
    print(f"  checkpointing on (baseline) {on:7.2f} s   off {off:7.2f} s   on / off {on / off:.2f}×  (off saves {1 - off / on:.0%} of the step)")


if __name__ == "__main__":
    main()
