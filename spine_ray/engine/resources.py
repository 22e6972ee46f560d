"""How a run's folds use the cluster: workers per fold, GPUs, lanes, the input pipeline (`ResourcesConfig`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ResourcesConfig:
    """How each fold is scaled and how many run at once."""

    num_workers: int = 1  # data-parallel workers per fold
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    # GPU share of each worker with use_gpu (Ray's fractional GPUs): 0.25 puts four fold jobs on one
    # GPU, each optimisation step unchanged (an H200 holds 5–10 % of its memory per recipe job).
    gpus_per_worker: float = 1.0
    max_failures: int = 2  # worker restarts per Ray Train run (a job, or a slot's lane of jobs), each from the job's last epoch
    max_concurrent_folds: int = 0  # 0: as many as the cluster can run now (every fold, on a GPU cluster still scaling up)
    # How a slot (one fold job's worth of CPUs/GPUs that the run's schedule fills) runs the jobs the
    # board gives it. "on": one Ray Train run per slot trains them one after another (a lane), so
    # Ray's start-up (a controller and worker processes that import torch: 7–25 s a job on a 2-core
    # box) is paid once per slot. "off": one Ray Train run per job, so the slot's CPUs/GPUs go back
    # between jobs (an autoscaler may remove a node while its slot waits for ready work). "auto":
    # on for CPU folds (short: start-up is a large share), off with GPUs (hours a fold).
    pack_folds: str = "auto"
    # A finished run of the same members whose measured fold times set this run's priorities (the
    # schedule starts the ready job of longest critical path first); without one, a size proxy.
    plan_from: str | None = None
    # How often Ray Train's controller collects worker reports (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S,
    # Ray's default 2 s). A worker's report blocks until the previous one is collected, so epochs
    # shorter than this are throttled to it; an explicit environment variable wins.
    poll_interval_s: float = 0.5
    # The input pipeline of each training worker: Ray Data tasks that read cached samples and
    # augment them. data_cpus is the CPU each task asks for; 0 lets them share the CPUs the
    # training workers hold (a laptop or CI box, where every CPU is a trainer). On a GPU node give
    # them real CPUs: data_concurrency tasks per worker, each data_cpus.
    data_cpus: float = 0.0
    data_concurrency: int = 1
    # Where augmentation runs: "ray" (Ray Data tasks, the GPU cluster's path), "thread" (a
    # background thread of the training worker, for CPU-only boxes where every CPU is a trainer
    # and worker processes would only add start-up and copies), "auto" (thread when data_cpus is 0
    # and there is no GPU, else ray). Both augment the same parts with the same generators.
    input_pipeline: str = "auto"
    chunk_studies: int = 4  # studies per augmentation task
    prefetch_batches: int = 4  # augmented parts ready ahead of the trainer
    # Shuffle buffer of augmented samples, in MB (at least two batches): samples of one part share
    # a few studies, so batches drawn from a small buffer hold several levels of the same study.
    # A whole epoch when it fits (the CPU demo); on real data a few hundred samples.
    shuffle_mb: float = 512.0
    stream_window_mb: int = 256  # object-store budget of one worker's stream (Ray Data backpressures beyond it)

    def __post_init__(self) -> None:
        if self.num_workers < 1 or self.cpus_per_worker <= 0:
            raise ValueError("num_workers must be ≥ 1 and cpus_per_worker > 0")
        if not (self.gpus_per_worker > 0 and (self.gpus_per_worker <= 1 or float(self.gpus_per_worker).is_integer())):
            raise ValueError(f"gpus_per_worker must be in (0, 1] or a whole number, not {self.gpus_per_worker}")
        if self.poll_interval_s <= 0:
            raise ValueError("poll_interval_s must be > 0")
        if self.data_cpus < 0 or self.data_concurrency < 1 or self.chunk_studies < 1 or self.prefetch_batches < 1 or self.shuffle_mb < 0:
            raise ValueError("data_cpus must be ≥ 0; data_concurrency, chunk_studies and prefetch_batches ≥ 1; shuffle_mb ≥ 0")
        if self.pack_folds not in ("auto", "on", "off"):
            raise ValueError(f"pack_folds must be auto, on or off, not {self.pack_folds!r}")
        if self.input_pipeline not in ("auto", "ray", "thread"):
            raise ValueError(f"input_pipeline must be auto, ray or thread, not {self.input_pipeline!r}")
        if self.stream_window_mb < 16:
            raise ValueError("stream_window_mb must be ≥ 16")

    def worker_resources(self) -> dict[str, float]:
        """What each Ray Train worker asks for: its CPUs and, with use_gpu, its GPU share."""
        return {"CPU": self.cpus_per_worker, **({"GPU": self.gpus_per_worker} if self.use_gpu else {})}

    def packs(self) -> bool:
        """Whether a slot trains its jobs in one Ray Train run (what `pack_folds` resolves to)."""
        return self.pack_folds == "on" or (self.pack_folds == "auto" and not self.use_gpu)

    def pipeline(self) -> str:
        """The input pipeline that `auto` resolves to: "ray" or "thread"."""
        if self.input_pipeline != "auto":
            return self.input_pipeline
        return "thread" if self.data_cpus == 0 and not self.use_gpu else "ray"
