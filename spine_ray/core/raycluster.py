"""The one way spine-ray joins Ray: the cluster in RAY_ADDRESS (`ray job submit`, a head node), or a
local instance started here (no dashboard, usage stats off) sized to the CPUs asked for."""

from __future__ import annotations

import logging
import os


def init_ray(num_cpus: int | None = None, quiet: bool = False) -> None:
    """Connect to RAY_ADDRESS's cluster or start a local one; `quiet` keeps workers' logs off the console."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    level = logging.WARNING if quiet else logging.INFO
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=not quiet, logging_level=level)
    else:
        # A local instance sized to what was asked for, so a shared machine is not oversubscribed.
        ray.init(num_cpus=num_cpus or None, include_dashboard=False, log_to_driver=not quiet, logging_level=level)
