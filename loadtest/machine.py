"""Was the machine free for the benchmark? Other work on the same cores moves every figure (this
machine's runs differ by 20-30% with its neighbours), so a run says when it was not alone.

Two readings from /proc (Linux; elsewhere nothing is said): the share of CPU time busy over one second
just before the run (the server idle: anything busy then is someone else), and the 1-minute load average
at the end, against the number of cores (a server at full load keeps about one runnable thread per core;
well above that, something else competed with it).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

BUSY_BEFORE_LIMIT = 0.25  # share of all cores busy before the run
LOAD_PER_CORE_LIMIT = 1.5  # 1-minute load average per core at the end


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies since boot, from /proc/stat's first line; None where there is none."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_share(seconds: float = 1.0) -> float | None:
    """The share of CPU time (all cores) busy over the next `seconds`."""
    first = _cpu_times()
    time.sleep(seconds)
    second = _cpu_times()
    if first is None or second is None or second[1] == first[1]:
        return None
    return (second[0] - first[0]) / (second[1] - first[1])


def summary(busy_before: float | None) -> dict:
    """What goes into the result JSON under "machine"."""
    try:
        load_1m = os.getloadavg()[0]
    except OSError:
        load_1m = None
    return {"cores": os.cpu_count(), "busy_before": busy_before, "load_1m_at_end": load_1m}


def warnings(machine: dict) -> list[str]:
    """The reasons to distrust this run's figures, if any."""
    found = []
    busy, load, cores = machine["busy_before"], machine["load_1m_at_end"], machine["cores"] or 1
    if busy is not None and busy > BUSY_BEFORE_LIMIT:
        found.append(
            f"{busy:.0%} of the CPU was busy just before the run, with the server idle: something else is "
            "running here, and the figures compare badly with other runs"
        )
    if load is not None and load > LOAD_PER_CORE_LIMIT * cores:
        found.append(
            f"the load average was {load:.1f} on {cores} cores at the end of the run: other work competed "
            "with the server, and the figures compare badly with other runs"
        )
    return found
