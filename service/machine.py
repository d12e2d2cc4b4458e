"""Facts about the machine this process runs on."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["available_cores"]


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity (taskset), capped by a cgroup v2 CPU quota."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
    except (OSError, ValueError):
        return cores
    if quota == "max":
        return cores
    return max(1, min(cores, int(quota) // int(period)))
