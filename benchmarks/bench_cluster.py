"""Time per outer step: the in-process engine against Dask LocalClusters of 1 and 2
worker processes (``cluster=dask_local``), side by side in one run, with a model for more
workers and the bytes each step sends.

    python benchmarks/bench_cluster.py [--steps 6] [--samples 16] [override ...]

Each configuration trains ``--steps`` outer steps on the full batch of B = ``--samples``
MNIST inpainting samples (``outer.batch_size`` = B; embedded digits, the default FoE problem and
solvers; extra Hydra overrides are passed on, e.g. ``experiment=paper_mnist_inpainting
problem.data_path=...`` for the paper's protocol) through ``runner.run``; the per-step
figure is the median of the steps' ``step_time`` after the first (which holds the
workers' first imports and set-up).  The
Dask runs log each worker's seconds inside its engine, so a step splits into the slowest
worker's compute and the rest (messages, pickling, the driver): the overhead o(W).  On a
shared machine wall-clock seconds follow the other jobs, so each step's CPU seconds are
printed too: the slowest worker process's and the driver process's (all their threads,
read with psutil around each step; in-process both are the one process's), and the CPU
speed-up, the in-process step's CPU seconds over the slowest worker's.

The driver's calls to the workers are counted during the Dask runs (per method: calls
and the pickled bytes of the arguments out and of the answers back; Dask's messages add
small headers): one ``evaluate`` per busy worker per step (θ out; loss, gradient and
records back), one ``state`` per worker per checkpoint (the per-sample state, recycle
spaces included, gathered for the file) and ``loss`` calls only for ``outer=gd``'s
backtracking.

Model for W workers: T(W) = t_sample · ⌈B / W⌉ + o₀ + c · min(W, B), with t_sample the
in-process step time per sample, c the driver's seconds to pickle one shard's call and
unpickle its answer (measured) and o₀ the rest of the 1-worker overhead (the messages to
different workers overlap; the driver's pickling does not).  Bytes per step are the pickled sizes of
one shard's call (θ and its indices) and of its answer (per-sample losses,
hypergradients and records, counts): no state is sent in a step.
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import psutil
from hydra import compose, initialize_config_module

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from backends import get_backend  # noqa: E402
from backends.threads import pool_threads  # noqa: E402
from framework.experiment import checkpoint, runner  # noqa: E402
from framework.experiment.cluster import DaskEngine, ShardEngine  # noqa: E402
from framework.experiment.config import validate  # noqa: E402
from framework.experiment.engine_setup import make_engine  # noqa: E402
from framework.experiment.runner import run  # noqa: E402
from problems.factory import build_problems  # noqa: E402

REPEATS = 200  # pickling rounds timed per message size


class _Counted(DaskEngine):
    """The Dask engine, tallying its calls to the workers (see the module docstring) and
    each step's CPU seconds of the workers' and the driver's processes (``cpu``)."""

    tally: ClassVar[Counter] = Counter()
    cpu: ClassVar[list[tuple[list[float], float]]] = []

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.processes = [psutil.Process(pid) for pid in self.client.run(os.getpid).values()]

    def evaluate(self, theta: Any, indices: Sequence[int]) -> Any:
        before, driver = [_cpu(p) for p in self.processes], time.process_time()
        result = super().evaluate(theta, indices)
        self.cpu.append(([_cpu(p) - b for p, b in zip(self.processes, before, strict=True)],
                         time.process_time() - driver))
        return result

    def _call(self, method: str, parts: dict[int, tuple]) -> dict[int, Any]:
        done = super()._call(method, parts)
        self.tally[method, "calls"] += len(parts)
        self.tally[method, "out"] += sum(len(pickle.dumps(a, protocol=5)) for a in parts.values())
        self.tally[method, "back"] += sum(len(pickle.dumps(v, protocol=5)) for v in done.values())
        return done


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def _timed_engine(*args: Any) -> Any:
    """The in-process engine, its ``evaluate`` adding each step's CPU seconds to
    ``_Counted.cpu`` (as one worker's, the driver's the same)."""
    engine = make_engine(*args)
    evaluate = engine.evaluate

    def timed(theta: Any, indices: Sequence[int]) -> Any:
        t0 = time.process_time()
        result = evaluate(theta, indices)
        seconds = time.process_time() - t0
        _Counted.cpu.append(([seconds], seconds))
        return result

    engine.evaluate = timed
    return engine


def _steps(overrides: list[str], folder: Path, local: bool) -> list[dict]:
    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    summary = run(cfg, output_dir=folder, engine_factory=_timed_engine if local else None)
    return checkpoint.load(summary.checkpoint_path)["history"]


def _median(history: list[dict], key: str) -> float:
    return statistics.median(h[key] for h in history[1:])


def _messages(overrides: list[str], busy: int) -> tuple[int, int, float]:
    """Pickled bytes of one step's calls and answers with ``busy`` shards (θ₀, cold) and
    the driver's seconds per shard to pickle its call and unpickle its answer."""
    with initialize_config_module(config_module="conf", version_base="1.3"):
        c = validate(compose(config_name="config", overrides=overrides))
    theta = build_problems(c.problem, get_backend("numpy"), c.seed).theta0
    shard = list(range(0, c.problem.num_samples, busy))
    call = (theta, shard)
    answer = pickle.dumps(ShardEngine(c, shard, None).evaluate(theta, shard), protocol=5)
    t0 = time.perf_counter()
    for _ in range(REPEATS):
        pickle.dumps(call, protocol=5)
        pickle.loads(answer)
    seconds = (time.perf_counter() - t0) / REPEATS
    return busy * len(pickle.dumps(call, protocol=5)), busy * len(answer), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = parser.parse_args()
    base = [f"problem.num_samples={args.samples}", f"outer.batch_size={args.samples}",
            f"outer.steps={args.steps}",
            "tracking=disabled", "progress=false", "checkpoint.every=1000", *args.overrides]
    print(f"command: python benchmarks/bench_cluster.py {' '.join(sys.argv[1:])}")
    print(f"inputs: {' '.join(base)}; {os.cpu_count()} CPUs; load average before "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    rows, calls = {}, {}
    runner.DaskEngine = _Counted
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in (("in-process", ["cluster=local"]),
                            ("dask_local, 1 worker", ["cluster=dask_local", "cluster.workers=1"]),
                            ("dask_local, 2 workers",
                             ["cluster=dask_local", "cluster.workers=2"])):
            t0 = time.perf_counter()
            _Counted.tally.clear()
            _Counted.cpu.clear()
            history = _steps([*base, *extra], Path(tmp) / name.replace(" ", "_"),
                             local=name == "in-process")
            cpu_worker = statistics.median(max(w) for w, _ in _Counted.cpu[1:])
            cpu_driver = statistics.median(d for _, d in _Counted.cpu[1:])
            calls[name] = dict(_Counted.tally)
            step = _median(history, "step_time")
            workers = sorted(k for k in history[0] if k.endswith("_time") and
                             k.startswith("worker_"))
            slowest = statistics.median(max(h[k] for k in workers) for h in history[1:]) \
                if workers else step
            rows[name] = (step, slowest, len(workers), time.perf_counter() - t0,
                          _median(history, "worker_imbalance") if workers else math.nan,
                          cpu_worker, cpu_driver)
    threads = pool_threads()
    print(f"BLAS threads (driver): {threads}; per Dask worker: 1 "
          "(one thread, threadpoolctl limit in each worker)")
    print(f"load average after {' '.join(f'{v:.2f}' for v in os.getloadavg())}\n")
    local = rows["in-process"][0]
    local_cpu = rows["in-process"][5]
    print("| engine | s/step (median) | slowest worker s | overhead s | imbalance "
          "| speed-up | CPU s/step, slowest worker | driver CPU s/step | CPU speed-up | run s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, (step, slowest, _, wall, imbalance, cpu, driver) in rows.items():
        print(f"| {name} | {step:.3f} | {slowest:.3f} | {step - slowest:.3f} | "
              f"{imbalance:.2f} | {local / step:.2f} | {cpu:.3f} | {driver:.3f} | "
              f"{local_cpu / cpu:.2f} | {wall:.1f} |")
    print(f"\ncalls to the workers in each Dask run ({args.steps} steps, one checkpoint at "
          "the end); bytes pickled")
    print("| engine | method | calls | per step | bytes out/call | bytes back/call |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for name, tally in calls.items():
        for method in sorted({m for m, _ in tally}):
            n = tally[method, "calls"]
            print(f"| {name} | {method} | {n} | {n / args.steps:.2f} | "
                  f"{tally[method, 'out'] // n} | {tally[method, 'back'] // n} |")
    o1 = rows["dask_local, 1 worker"][0] - rows["dask_local, 1 worker"][1]
    per_sample = local / args.samples
    table = {w: _messages(base, min(w, args.samples)) for w in (1, 2, 8, 64)}
    c = table[1][2]  # the driver's own work per busy worker; the rest of o(1) is fixed
    o0 = o1 - c
    print(f"\nmodel: T(W) = {per_sample:.4f} s · ceil({args.samples}/W) + "
          f"({o0:.4f} + {c:.6f}·busy workers) s  (busy = min(W, B); t_sample from the "
          "in-process step, o₀ from the 1-worker overhead, c = pickling one call and its "
          "answer on the driver; messages to different workers overlap)")
    print("| workers | modelled s/step | speed-up | measured s/step | bytes out/step "
          "| bytes back/step |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    measured = {1: rows["dask_local, 1 worker"][0], 2: rows["dask_local, 2 workers"][0]}
    for w, (sent, back, _) in table.items():
        busy = min(w, args.samples)
        model = per_sample * math.ceil(args.samples / w) + o0 + c * busy
        seen = f"{measured[w]:.3f}" if w in measured else "-"
        print(f"| {w} | {model:.3f} | {local / model:.2f} | {seen} | {sent} | {back} |")


if __name__ == "__main__":
    main()
