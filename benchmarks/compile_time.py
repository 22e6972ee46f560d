"""What `train.compile` costs a fold job before its first step: torch.compile of a backbone, cold and from the on-disk cache.

A fold job compiles each batch shape its encoder sees once (`models.backbone.speed_up`: static
shapes): the training batch, the epoch's short last batch, the same in evaluation. This times, for
one timm backbone compiled as `speed_up` compiles it (in place, `dynamic=False`, channels-last,
bf16 autocast, AdamW), the first training step at batch B (the cold compilation), at batch B+2 (a
second shape), an evaluation forward, against the eager step; then the same again in a fresh
process, which finds the kernels in torch's on-disk cache (a second fold job on the same machine).
Each in a child process with its own empty TORCHINDUCTOR_CACHE_DIR.

    PYTHONPATH=. python benchmarks/compile_time.py [--backbone convnext_small] [--px 64] [--batch 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def child(backbone: str, px: int, batch: int, device_name: str) -> dict[str, float]:
    """Seconds of each first step, in this process (the cache directory is the caller's)."""
    import timm
    import torch

    device = torch.device(device_name)
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    model = timm.create_model(backbone, pretrained=False, num_classes=3).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), 1e-4)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step(b: int, train: bool = True) -> float:
        x = torch.randn(b, 3, px, px, device=device).to(memory_format=torch.channels_last)
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16), torch.set_grad_enabled(train):
            y = model(x).float().mean()
        if train:
            opt.zero_grad()
            y.backward()
            opt.step()
        sync()
        return time.perf_counter() - t

    model.train()
    step(batch)
    eager = step(batch)  # the eager step, after its own warm-up
    model.compile(dynamic=False)
    out = {"eager_step": eager, "first_step": step(batch), "next_step": step(batch), "other_batch": step(batch + 2)}
    model.eval()
    out["eval"] = step(batch, train=False)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="convnext_small")
    ap.add_argument("--px", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.backbone, args.px, args.batch, args.device)))
        return
    with tempfile.TemporaryDirectory(prefix="inductor-") as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        runs = {}
        for name in ("cold", "warm"):
            t = time.perf_counter()
            res = subprocess.run([sys.executable, __file__, "--child", *sys.argv[1:]], env=env, capture_output=True, text=True, check=True)
            runs[name] = json.loads(res.stdout.strip().splitlines()[-1])
            runs[name]["process"] = time.perf_counter() - t
    print(f"{args.backbone} at {args.px} px, batch {args.batch}, {args.device}, {os.cpu_count()} cores: seconds")
    print("| | eager step | first compiled step | next step | batch +2 (a new shape) | evaluation | whole process |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in runs.items():
        label = "cold cache" if name == "cold" else "on-disk cache (a new process)"
        print(f"| {label} | {r['eager_step']:.2f} | {r['first_step']:.1f} | {r['next_step']:.2f} | {r['other_batch']:.1f} | {r['eval']:.1f} | {r['process']:.0f} |")
    cold, warm = runs["cold"], runs["warm"]
    first = cold["first_step"] + cold["other_batch"] + cold["eval"]
    again = warm["first_step"] + warm["other_batch"] + warm["eval"]
    print(f"three shapes compiled: {first:.0f} s cold, {again:.0f} s from the cache ({first / again:.1f}x); "
          f"cold = {first / cold['eager_step']:.0f} eager steps")


if __name__ == "__main__":
    main()
