"""What `train.compile` costs a fold job before its first step: torch.compile of a backbone, cold and from the on-disk cache.

A fold job compiles each batch shape its encoder sees once (`models.backbone.speed_up`: static
shapes): the training batch, the epoch's short last batch, the same in evaluation. This times, for
one timm backbone compiled as `speed_up` compiles it (in place, `dynamic=False`, channels-last,
bf16 autocast, AdamW), the first training step at batch B (the cold compilation), at batch B+2 (a
second shape), an evaluation forward, against the eager step; then the same again in a fresh
process, which finds the kernels in torch's on-disk cache (a second fold job on the same machine);
then in a fresh process with an empty cache that first loads the artifacts the cold run saved
(`torch.compiler.save_cache_artifacts`, as `engine.compile_cache` shares them through a run's
storage: a fold job on another node).

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


def child(backbone: str, px: int, batch: int, device_name: str, save: str = "", load: str = "") -> dict[str, float]:
    """Seconds of each first step, in this process (the cache directory is the caller's); `load` the artifacts in this
    file first (its seconds too), `save` this process's artifacts to that file at the end."""
    import timm
    import torch

    loaded = 0.0
    if load:
        t = time.perf_counter()
        with open(load, "rb") as f:
            torch.compiler.load_cache_artifacts(f.read())
        loaded = time.perf_counter() - t

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
    out["load"] = loaded
    if save:
        artifacts = torch.compiler.save_cache_artifacts()
        with open(save, "wb") as f:
            f.write(artifacts[0])
        out["artifact_mib"] = len(artifacts[0]) / 2**20
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="convnext_small")
    ap.add_argument("--px", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--save", default="", help=argparse.SUPPRESS)
    ap.add_argument("--load", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.backbone, args.px, args.batch, args.device, args.save, args.load)))
        return
    mine = [a for a in sys.argv[1:] if a != "--child"]
    with tempfile.TemporaryDirectory(prefix="inductor-") as tmp:
        artifacts = os.path.join(tmp, "artifacts.bin")
        runs = {}
        # (name, local cache folder, extra arguments): cold saves its artifacts; warm reuses cold's folder; shared starts empty and loads them.
        for name, cache, extra in (("cold", "a", ["--save", artifacts]), ("warm", "a", []), ("shared", "b", ["--load", artifacts])):
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": os.path.join(tmp, cache)}
            t = time.perf_counter()
            res = subprocess.run([sys.executable, __file__, "--child", *mine, *extra], env=env, capture_output=True, text=True, check=True)
            runs[name] = json.loads(res.stdout.strip().splitlines()[-1])
            runs[name]["process"] = time.perf_counter() - t
    print(f"{args.backbone} at {args.px} px, batch {args.batch}, {args.device}, {os.cpu_count()} cores: seconds")
    labels = {"cold": "cold cache", "warm": "on-disk cache (a new process)", "shared": "empty cache + the cold run's artifacts loaded"}
    print("| | eager step | loading artifacts | first compiled step | next step | batch +2 (a new shape) | evaluation | whole process |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in runs.items():
        print(f"| {labels[name]} | {r['eager_step']:.2f} | {r['load']:.1f} | {r['first_step']:.1f} | {r['next_step']:.2f} | {r['other_batch']:.1f} | "
              f"{r['eval']:.1f} | {r['process']:.0f} |")
    shapes = {name: r["load"] + r["first_step"] + r["other_batch"] + r["eval"] for name, r in runs.items()}
    cold = shapes["cold"]
    print(f"three shapes compiled: {cold:.0f} s cold, {shapes['warm']:.0f} s from the on-disk cache ({cold / shapes['warm']:.1f}x), "
          f"{shapes['shared']:.0f} s from the shared artifacts ({cold / shapes['shared']:.1f}x; {runs['cold']['artifact_mib']:.1f} MiB); "
          f"cold = {cold / runs['cold']['eager_step']:.0f} eager steps")


if __name__ == "__main__":
    main()
