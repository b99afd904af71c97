"""Wall time of the default `hyperkrylov` job as a new user runs it, alone and two at once.

    python benchmarks/bench_default_job.py [--rounds 2]

Each case runs in a fresh empty folder (so start-up includes creating the MLflow store),
with the README's command and no thread variables in the environment
(OPENBLAS/OMP/MKL_NUM_THREADS and MLFLOW_TRACKING_URI removed).  Cases, interleaved per
round so that they see the same machine load:

* ``alone``: one default job;
* ``pair``: two default jobs started together in one folder (one store, two output dirs);
* ``pair, num_threads=2``: the same pair with ``backend.num_threads=2`` (two BLAS threads
  per job, what every job got before the limit existed on a 2-core machine).

Prints the seconds of every job, the final upper loss (equal across cases: threads do not
change results beyond rounding) and the machine's load average before each round.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                    "MLFLOW_TRACKING_URI")


def _command() -> list[str]:
    script = Path(sys.executable).parent / "hyperkrylov"
    found = str(script) if script.exists() else shutil.which("hyperkrylov")
    if not found:
        raise SystemExit("hyperkrylov is not installed: pip install -e . first")
    return [found]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}


def _start(folder: Path, *overrides: str) -> tuple[subprocess.Popen, float]:
    proc = subprocess.Popen([*_command(), *overrides], cwd=folder, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, time.perf_counter()


def _finish(job: tuple[subprocess.Popen, float]) -> tuple[float, str]:
    proc, started = job
    out, _ = proc.communicate()
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"job failed ({proc.returncode}):\n{out}")
    loss = re.search(r"upper loss \S+ → (\S+?)(?:;|$)", out, re.MULTILINE)
    return seconds, loss.group(1) if loss else "?"


def _case(name: str, *extra: str) -> list[tuple[float, str]]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if name == "alone":
            return [_finish(_start(folder, *extra))]
        jobs = [_start(folder, f"hydra.run.dir=outputs/job{i}", *extra) for i in (1, 2)]
        return [_finish(job) for job in jobs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    print(f"cpus: {os.cpu_count()}; environment without {', '.join(THREAD_VARIABLES)}; "
          "each job's BLAS threads: backend.num_threads (auto: 1), as the job prints")
    cases = [("alone", ()), ("pair", ()), ("pair, num_threads=2", ("backend.num_threads=2",))]
    for r in range(args.rounds):
        for name, extra in cases:
            load = os.getloadavg()[0]
            results = _case(name.split(",")[0], *extra)
            times = ", ".join(f"{s:.1f} s (loss {loss})" for s, loss in results)
            print(f"round {r + 1}  {name:22s} load {load:4.1f}  {times}", flush=True)


if __name__ == "__main__":
    main()
