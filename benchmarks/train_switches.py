"""Cost of the stage-2 training switches (issue 14), each against its baseline in the same run.

  augment   `augment_samples` on a batch of sample rows: no mixing (baseline) vs CutMix p = 1 vs mixup p = 1
  step      one optimizer step (forward, backward, AdamW) of the grader: every weight trains (baseline,
            two-step's step 1) vs the frozen backbone (two-step's step 2) vs the backbone's last block
            unfrozen (`freeze.unfreeze_last: 1`)

Sample rows are random patches of the real shape (six slots, 2(k + max_shift) + 1 slices); the
ratios, not the seconds, are the result (the machine may be shared). CPU by default.

    python benchmarks/train_switches.py --backbone resnet18 --px 64 --batch 8 --reps 5
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from spine_ray.core.schema import LEVELS
from spine_ray.engine.stage import FoldJob
from spine_ray.models.grader import GraderConfig
from spine_ray.stages.grade.augment import augment_samples, batch_tensors
from spine_ray.stages.grade.config import FreezeConfig, GradeConfig, MixConfig
from spine_ray.stages.grade.stage import GradeStage
from spine_ray.stages.localize import VIEWS, ViewConfig


def sample_rows(cfg: GradeConfig, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """n sample rows of random patches with every slot present and labelled."""
    t, kk, p = len(cfg.slots), cfg.k + cfg.max_shift, cfg.patch_px
    shape = (t, 2 * kk + 1, p, p)
    return {
        "study_id": np.arange(n), "level": np.array([LEVELS[i % 5] for i in range(n)], object),
        "x": np.array([rng.random(shape).astype(np.float16).tobytes() for _ in range(n)], object),
        "shape": np.array([list(shape)] * n, object), "inside": np.array([np.ones(shape[:2], bool).tobytes()] * n, object),
        "target_mask": np.array([np.ones(t, bool).tobytes()] * n, object),
        "labels": np.array([rng.integers(0, 3, t).astype(np.int8).tobytes() for _ in range(n)], object),
        "gt_offset": np.array([np.zeros(t, np.int8).tobytes()] * n, object),
    }


def stack_rows(view: str, cfg: ViewConfig, n: int, rng: np.random.Generator) -> dict[str, object]:
    """n stage-1 sample rows of one view: random stored stacks [slices, size, size] float16, every point visible."""
    p, shape = len(VIEWS[view][1]), (cfg.slices, cfg.size, cfg.size)
    return {"x": [rng.random(shape).astype(np.float16).tobytes() for _ in range(n)], "shape": np.asarray([shape] * n),
            "coords": [np.zeros((p, 3), np.float32).tobytes()] * n, "visible": [np.ones(p, bool).tobytes()] * n}


def timed(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median seconds per call of each function, after a warm-up call; calls alternate so load drifts hit all alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    """Print seconds and the ratio against each baseline."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--px", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = GraderConfig(backbone=args.backbone, dim=128, lstm_hidden=64, level_embedding=True, condition_embedding=True, n_views=3)
    base = GradeConfig(model=model, out_px=args.px, multiview_spinal=True)
    rows = sample_rows(base, args.batch, np.random.default_rng(0))

    print(f"stage-2 switches: {args.backbone}, {args.px} px, batch {args.batch}, {len(base.slots)} slots × {2 * base.k + 1} slices, "
          f"{args.threads} thread(s), median of {args.reps}")
    aug = {
        "no mix": base,
        "cutmix p=1": dataclasses.replace(base, mix=MixConfig(cutmix_p=1.0)),
        "mixup p=1": dataclasses.replace(base, mix=MixConfig(mixup_p=1.0)),
    }
    secs = timed({k: (lambda c=c: augment_samples(c, rows, np.random.default_rng(1))) for k, c in aug.items()}, args.reps)
    for k, s in secs.items():
        print(f"  augment {k:<14} {s * 1e3:8.1f} ms/batch   ×{s / secs['no mix']:.3f}")

    stage = GradeStage()
    batch = batch_tensors(base, augment_samples(base, rows, np.random.default_rng(1)))
    steps = {
        "all weights": base,
        "frozen backbone": dataclasses.replace(base, freeze=FreezeConfig(backbone=True)),
        "last block": dataclasses.replace(base, freeze=FreezeConfig(backbone=True, unfreeze_last=1)),
    }
    fns = {}
    for k, c in steps.items():
        job = FoldJob("grade", k, 0, 1, c, "", "", {})
        torch.manual_seed(0)
        net = stage.build_model(job.member, job.config)
        stage.set_trainable(job, net)
        net.train()
        opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)

        def step(net: torch.nn.Module = net, opt: torch.optim.Optimizer = opt, job: FoldJob = job) -> None:
            loss, _ = stage.loss(job, net, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        fns[k] = step
    secs = timed(fns, args.reps)
    for k, s in secs.items():
        print(f"  step {k:<17} {s:8.3f} s/step     ×{s / secs['all weights']:.3f}")


if __name__ == "__main__":
    main()
