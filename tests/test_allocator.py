"""``backends.tune_cpu_allocator``: freed memory stays in the process and is reused,
measured in fresh processes (``mallopt`` holds for a process's life) by the kernel's
count of minor page faults."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# A child allocates, fills and frees a 64 MiB array (the size of the BSDS preset's
# temporaries) ten times after one warm-up round, and prints the minor page faults of
# those ten rounds.  Pages that come back from the kernel fault at least once per 2 MiB
# huge page (32 per round), or per 4 KiB page (16384 per round); memory the process
# kept does not fault.  glibc's own default keeps such a block only once its dynamic
# mmap threshold has grown past it, which it cannot (the threshold stops at 32 MiB).
CHILD = """
import resource, sys
import numpy as np
from backends import tune_cpu_allocator
applied = tune_cpu_allocator() if sys.argv[1] == "tuned" else False
def rounds(count):
    for _ in range(count):
        a = np.empty(8 * 1024 * 1024)
        a.fill(1.0)
        del a
rounds(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
rounds(10)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt only (elsewhere nothing is changed)")
def test_freed_memory_is_reused_without_page_faults() -> None:
    applied, tuned = _faults("tuned")
    _, default = _faults("default")
    assert applied
    assert default >= 10 * 32  # every round's pages came back from the kernel
    assert tuned < 10  # reused: (almost) no faults, whatever the page size


def test_build_samples_tunes_the_numpy_heap(monkeypatch) -> None:
    from framework.experiment import engine_setup
    from framework.experiment.config import validate

    calls = []
    monkeypatch.setattr(engine_setup, "tune_cpu_allocator", lambda: calls.append(1) or True)
    engine_setup.build_samples(validate({"problem": {"num_samples": 1}}))
    assert calls == [1]
    engine_setup.build_samples(validate({"problem": {"num_samples": 1},
                                         "backend": {"name": "array_api_strict"}}))
    assert calls == [1]  # NumPy's heap only
