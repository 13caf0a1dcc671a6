"""This process's resource use, read from /proc: resident memory and open descriptors."""

from __future__ import annotations

import os


def rss_kb() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))
