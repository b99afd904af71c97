"""Wall and CPU time of the default `hyperkrylov` job as a new user runs it, alone and two at once.

    python benchmarks/bench_default_job.py [--rounds 2] [--source DIR ...]

Each case runs in a fresh empty folder (so start-up includes creating the MLflow store),
with the README's command and no thread variables in the environment
(OPENBLAS/OMP/MKL_NUM_THREADS and MLFLOW_TRACKING_URI removed).  ``--source DIR`` runs
``python -m framework.experiment.app`` of the checkout DIR instead of the installed command
(give several to compare checkouts side by side).  Cases, interleaved per round so that
they see the same machine load:

* ``alone``: one default job;
* ``pair``: two default jobs started together in one folder (one store, two output dirs);
* ``pair, num_threads=2``: the same pair with ``backend.num_threads=2`` (two BLAS threads
  per job, what every job got before the limit existed on a 2-core machine).

Prints the wall and CPU (user + system) seconds of every job, the final upper loss (equal
across cases: threads do not change results beyond rounding) and the machine's load
average before each case.
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
                    "MLFLOW_TRACKING_URI", "PYTHONPATH")


def _command(source: str | None) -> tuple[list[str], dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    if source is not None:
        return [sys.executable, "-m", "framework.experiment.app"], {**env, "PYTHONPATH": source}
    script = Path(sys.executable).parent / "hyperkrylov"
    found = str(script) if script.exists() else shutil.which("hyperkrylov")
    if not found:
        raise SystemExit("hyperkrylov is not installed: pip install -e . first")
    return [found], env


def _start(source: str | None, folder: Path, *overrides: str) -> tuple[subprocess.Popen, float]:
    command, env = _command(source)
    proc = subprocess.Popen([*command, *overrides], cwd=folder, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, time.perf_counter()


def _finish(job: tuple[subprocess.Popen, float]) -> str:
    proc, started = job
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"job failed ({os.waitstatus_to_exitcode(status)}):\n{out}")
    loss = re.search(r"upper loss \S+ → (\S+?)(?:;|$)", out, re.MULTILINE)
    cpu = usage.ru_utime + usage.ru_stime
    return f"{seconds:.1f} s (cpu {cpu:.1f} s, loss {loss.group(1) if loss else '?'})"


def _case(source: str | None, name: str, *extra: str) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if name == "alone":
            return [_finish(_start(source, folder, *extra))]
        jobs = [_start(source, folder, f"hydra.run.dir=outputs/job{i}", *extra) for i in (1, 2)]
        return [_finish(job) for job in jobs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--source", action="append", help="checkout to run (repeatable)")
    args = parser.parse_args()
    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    print(f"cpus: {os.cpu_count()}; environment without {', '.join(THREAD_VARIABLES)}; "
          "each job's BLAS threads: backend.num_threads (auto: 1), as the job prints")
    cases = [("alone", ()), ("pair", ()), ("pair, num_threads=2", ("backend.num_threads=2",))]
    for r in range(args.rounds):
        for name, extra in cases:
            for source in args.source or [None]:
                load = os.getloadavg()[0]
                times = ", ".join(_case(source, name.split(",")[0], *extra))
                label = f"{name} {source or 'hyperkrylov'}"
                print(f"round {r + 1}  {label:40s} load {load:4.1f}  {times}", flush=True)


if __name__ == "__main__":
    main()
