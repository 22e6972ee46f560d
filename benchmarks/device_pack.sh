#!/usr/bin/env bash
# Ray for a bare GPU machine without network: .whl/ray-site.tar.xz, one archive of Ray 2.60.0 and
# only those of its dependencies (core, Ray Data, Ray Train/Tune) that the device lacks, so that
# benchmarks/gpu.py takes its Ray Train path there (a one-worker TorchTrainer, Ray Data input).
#
# The device (x86-64, Python 3.12) already has numpy, pandas, pyarrow, torch, timm, scipy, pyyaml,
# click, filelock, msgpack, protobuf, requests, aiohttp, grpcio, fsspec, packaging, psutil, attrs,
# cloudpickle, ...; the archive adds what Ray's Requires-Dist (core + data/train/tune extras) needs
# beyond them, as pinned in PKGS below: jsonschema (+ referencing, jsonschema-specifications,
# rpds-py), pydantic (+ pydantic-core, annotated-types, typing-inspection, typing-extensions>=4.16,
# which pydantic 2.14 asks for), tensorboardX. Ray's default extra (dashboard, opencensus,
# opentelemetry, smart_open, virtualenv, py-spy) is not carried: spine-ray starts Ray with
# include_dashboard=False, and the agents then run in Ray's minimal mode.
#
# Removed from the ray package (nothing on the Ray Train/Data path imports or runs them):
#   ray/jars (Java workers), ray/rllib, ray/llm, ray/serve (other libraries), ray/dashboard/client
#   (the web UI's static files: served only by the dashboard, which is off), console scripts (bin/).
# Everything in ray/core (gcs_server, raylet, libjemalloc), ray/_raylet.so and ray/dashboard's
# Python (the per-node agent, the minimal dashboard head) stay. No .pyc files: the preamble compiles.
#
# Build here (pip and the registry needed; ~10 s of download, ~1.5 minutes of xz on one core):
#     bash benchmarks/device_pack.sh      # -> .whl/ray-site.tar.xz: 26 MiB (cp312), 157 MiB unpacked
#     bash benchmarks/device_pack.sh --python-version 3.11 --out /tmp/ray-site311.tar.xz   # a local test
# Nothing else may sit in .whl/: it all travels. Working tree (~4 MiB) + archive: ~31 MiB of the 64.
#
# Device preamble (unpack, then compile to .pyc: Ray's raylet waits a fixed 15 s for its dashboard
# agent's port file, and an agent importing Ray from uncompiled sources on a busy machine missed it
# here: "Check failed: ... Timed out waiting for file .../metrics_agent_port_*"):
#     mkdir -p /tmp/site && tar xJf .whl/ray-site.tar.xz -C /tmp/site && { python3 -m compileall -q -j0 /tmp/site >/dev/null || true; }
# then PYTHONPATH=/tmp/site:. (the repository root too) on the command. `benchmarks/device_run.py`
# does all of it, then runs gpu.py and gpu_learn.py inside one deadline: one run command with
# carry: [".whl"] and a run timeout of 600 s:
#     python3 benchmarks/device_run.py --out $OUT
# gpu.log's first line must say "fit: a one-worker Ray Train TorchTrainer (engine.worker.train_worker), Ray
# Data input ..."; "in-process fit_fold (Ray not importable here)" means the archive did not unpack.
# Ray's worker processes inherit PYTHONPATH, so they import the same /tmp/site.
set -euo pipefail

PYVER=3.12
OUT=.whl/ray-site.tar.xz
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --python-version) PYVER="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "device_pack.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
    esac
done

# Ray and what it needs that the device lacks; pure Python but for ray, rpds-py and pydantic-core.
PKGS=(
    ray==2.60.0
    jsonschema==4.26.0 referencing==0.37.0 jsonschema-specifications==2025.9.1 rpds-py==2026.9.1
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
    tensorboardX==2.6.5
)
TARGET=(--only-binary=:all: --python-version "$PYVER" --implementation cp
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

export PIP_DISABLE_PIP_VERSION_CHECK=1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps "${TARGET[@]}" -d "$tmp/wheels" "${PKGS[@]}"
# --target with the target's tags: pip installs another Python's wheels without running them.
python3 -m pip install -q --root-user-action=ignore --no-deps --no-compile "${TARGET[@]}" --target "$tmp/site" "$tmp"/wheels/*.whl

site="$tmp/site"
rm -rf "${site:?}/bin" "$site/ray/jars" "$site/ray/rllib" "$site/ray/llm" "$site/ray/serve" "$site/ray/dashboard/client"
find "$site" -name __pycache__ -type d -prune -exec rm -rf {} +
for f in ray/_raylet.so ray/core/src/ray/raylet/raylet ray/core/src/ray/gcs/gcs_server; do
    test -s "$site/$f" || { echo "device_pack.sh: $f missing from the ray wheel" >&2; exit 1; }
done

mkdir -p "$(dirname "$OUT")"
nice -n 10 tar -C "$site" -cf - . | nice -n 10 xz -9 -T1 > "$OUT.part"
mv "$OUT.part" "$OUT"
echo "bundled (python $PYVER): ${PKGS[*]}"
echo "$OUT: $(du -m "$OUT" | cut -f1) MiB ($(stat -c %s "$OUT") bytes), unpacked $(du -sm "$site" | cut -f1) MiB"
echo "$(dirname "$OUT")/ holds $(du -sm "$(dirname "$OUT")" | cut -f1) MiB in all: carry takes the whole folder"
