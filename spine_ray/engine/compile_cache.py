"""torch.compile's kernels shared by a run's fold jobs through the run's storage (local or S3).

With `train.compile` every fold job compiles its encoders for each batch shape it sees; cold,
that is minutes a job (docs/scale-out.md), from torch's on-disk cache seconds. That cache is
per machine: on a cluster of many nodes, every node compiles every network once. Here a job that
compiled anything new saves torch's cache artifacts (`torch.compiler.save_cache_artifacts`: the
compiled graphs and kernels, keyed by what they compile) under the run's storage, and a job about
to compile loads those of its network first (`load_cache_artifacts` fills the local cache), so
across the cluster a network and shape is compiled about once, by the first wave of jobs.

    {run_dir}/compile_cache/{network}--{member}-fold{k}.{n}.bin

A file is written by the job it names only (no two writers), atomically, when that job's process
has compiled graphs the cache did not hold: after its first epoch (the training shapes, and the
validation's where it validates; n = 0) and again after its held-out prediction (n = 1). Each save
is a file of its own: torch appends every save to one buffer, but on loading keeps only the last
save's artifacts of each kind (torch 2.14: `CacheArtifactManager.deserialize` makes a dict of the
appended parts), so one file rewritten at each save would lose the training graphs.

A file that does not load (another torch version, a torn upload), a folder that cannot be listed
and a save that fails are warnings: the job compiles, or goes on, as it would have without the
cache. Without the API (torch < 2.7) nothing is saved or loaded.
"""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

from spine_ray.core.storage import atomic_write_bytes, join, listdir, read_bytes
from spine_ray.models.backbone import backbones

log = logging.getLogger(__name__)

FOLDER = "compile_cache"


def supported() -> bool:
    """Whether this torch can save and load its compile cache (the mega-cache API, torch >= 2.7)."""
    return hasattr(torch, "compiler") and hasattr(torch.compiler, "save_cache_artifacts") and hasattr(torch.compiler, "load_cache_artifacts")


def network_key(model: nn.Module) -> str:
    """A file-name-safe name of a model's compiled encoder network (timm's architecture, else its class)."""
    encoders = backbones(model) or [model]
    enc = encoders[0]
    name = (getattr(enc, "pretrained_cfg", None) or {}).get("architecture") or type(enc).__name__
    return re.sub(r"[^A-Za-z0-9_.]+", "_", str(name))


def _misses() -> int:
    """Graphs this process has compiled that torch's cache did not hold."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["fxgraph_cache_miss"])


class CompileCache:
    """One fold job's share of the run's compile cache: `load` before compiling, `save` after compiling something new."""

    def __init__(self, run_dir: str, network: str, job_name: str) -> None:
        self.folder = join(run_dir, FOLDER)
        self.network, self.job_name = network, job_name
        self.saved_misses = _misses()  # what this process compiled before this job is not its to save
        self.part = 0

    def load(self) -> int:
        """Load every saved file of this network into torch's local cache; how many loaded."""
        if not supported():
            return 0
        loaded = 0
        try:
            names = listdir(self.folder)
        except Exception as e:  # noqa: BLE001 - an unreachable cache is only a colder start
            log.warning("compile cache %s not read (%s: %s): this job compiles from its node's cache", self.folder, type(e).__name__, e)
            return 0
        for name in names:
            if not (name.startswith(f"{self.network}--") and name.endswith(".bin")):
                continue
            try:
                if torch.compiler.load_cache_artifacts(read_bytes(join(self.folder, name))) is not None:
                    loaded += 1
            except Exception as e:  # noqa: BLE001 - any file that does not load is only a colder start
                log.warning("compile cache %s skipped (%s: %s): this job compiles it again", name, type(e).__name__, e)
        if loaded:
            log.info("compile cache: %d file(s) of %s loaded from %s", loaded, self.network, self.folder)
        return loaded

    def save(self) -> bool:
        """Save this process's cache artifacts as this job's file, if it compiled anything the cache lacked since the last save."""
        if not supported() or _misses() <= self.saved_misses:
            return False
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
            return False  # data-parallel ranks compile the same graphs: rank 0's file is the job's
        self.saved_misses = _misses()
        name = f"{self.network}--{self.job_name}.{self.part}.bin"
        try:
            out = torch.compiler.save_cache_artifacts()
            if out is None:
                return False
            atomic_write_bytes(join(self.folder, name), out[0])
        except Exception as e:  # noqa: BLE001 - a cache that cannot be written costs later jobs time, never this one its run
            log.warning("compile cache %s not saved (%s: %s): later jobs compile it themselves", name, type(e).__name__, e)
            return False
        self.part += 1
        return True


_active: CompileCache | None = None  # the process's current job's: compiled code is per process, like torch's own cache


def begin(run_dir: str, model: nn.Module, job_name: str, enabled: bool) -> CompileCache | None:
    """Start a fold job's share of the run's compile cache (None, and nothing saved for it, where not `enabled`): its
    network's saved files are loaded now, before the first step compiles; `save_active` saves to it."""
    global _active
    _active = CompileCache(run_dir, network_key(model), job_name) if enabled and supported() else None
    if _active is not None:
        _active.load()
    return _active


def save_active() -> bool:
    """`CompileCache.save` for the process's current job, if it has one (else nothing)."""
    return _active.save() if _active is not None else False
