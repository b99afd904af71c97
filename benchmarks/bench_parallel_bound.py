"""The most two processes can gain on this machine, without Dask: the in-process engine's
step over B samples against two plain processes stepping one shard each at the same time.

    python benchmarks/bench_parallel_bound.py [--steps 12] [--samples 16] [override ...]

First the in-process engine (the default problem and solvers, B = ``--samples``, Adam as
``outer``) takes ``--steps`` steps and records θ of every step and each step's seconds.
Then a fresh ``cluster.ShardEngine`` (the class a Dask worker holds) over all samples
re-evaluates that θ path (the reference: the in-process step without the optimiser), and
so do the shards of ``cluster=dask_local`` with 2 workers (sample i on shard i mod 2), in
two ways:

- *alone*: one process steps shard 0 while nothing else runs;
- *together*: two ``multiprocessing`` processes (spawned, one BLAS thread each) step the two
  shards at the same time, meeting at a barrier before every step, so each step's time is
  the slower shard's.

No messages, pickling or scheduler are involved, so reference / together is an upper bound
on the 2-worker speed-up any engine of separate processes reaches here, and together /
alone shows what running two processes at once costs each of them (shared caches, memory
bandwidth, the host).  Medians over the steps after the first.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from framework.experiment.cluster import ShardEngine
from framework.experiment.config import validate
from framework.experiment.engine_setup import build_samples, make_engine
from framework.optim import make_optimizer

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def _config(samples: int, overrides: list[str]):
    with initialize_config_dir(config_dir=CONF, version_base=None):
        return validate(compose(config_name="config", overrides=[
            f"problem.num_samples={samples}", f"outer.batch_size={samples}",
            "tracking=disabled", *overrides]))


def _in_process(cfg, steps: int) -> tuple[list[np.ndarray], list[float]]:
    backend, problem_set = build_samples(cfg)
    engine = make_engine(problem_set, cfg, backend)
    optimizer = make_optimizer(cfg.outer, mask=problem_set.mask)
    theta = backend.asarray(problem_set.theta0)
    thetas, seconds = [], []
    for _ in range(steps):
        thetas.append(backend.to_numpy(theta))
        t0 = time.perf_counter()
        result = engine.evaluate(theta, list(range(len(problem_set))))
        theta = optimizer.step(theta, result.grad).theta
        seconds.append(time.perf_counter() - t0)
    return thetas, seconds


def _shard(cfg, shard: list[int], thetas: list[np.ndarray], barrier=None) -> list[float]:
    """Seconds of each step of ``ShardEngine(shard)`` along ``thetas``."""
    with threadpool_limits(limits=1):
        engine = ShardEngine(cfg, shard, None)
        seconds = []
        for theta in thetas:
            if barrier is not None:
                barrier.wait()
            t0 = time.perf_counter()
            engine.evaluate(theta, shard)
            seconds.append(time.perf_counter() - t0)
    return seconds


def _worker(cfg, shard, thetas, barrier, out) -> None:
    out.put((shard[0], _shard(cfg, shard, thetas, barrier)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = parser.parse_args()
    print(f"command: python benchmarks/bench_parallel_bound.py {' '.join(sys.argv[1:])}")
    print(f"{os.cpu_count()} CPUs; load average before "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}; one BLAS thread per process")
    cfg = _config(args.samples, args.overrides)
    with threadpool_limits(limits=1):
        thetas, trained = _in_process(cfg, args.steps)
    shards = [list(range(k, args.samples, 2)) for k in (0, 1)]
    whole = _shard(cfg, list(range(args.samples)), thetas)  # the same path, as the shards
    alone = _shard(cfg, shards[0], thetas)
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(cfg, s, thetas, barrier, out)) for s in shards]
    for p in procs:
        p.start()
    times = dict(out.get() for _ in procs)
    for p in procs:
        p.join()
    together = [max(a, b) for a, b in zip(times[0], times[1], strict=True)]

    def med(xs: list[float]) -> float:
        return statistics.median(xs[1:])

    print(f"load average after {' '.join(f'{v:.2f}' for v in os.getloadavg())}\n")
    print("| run | s/step (median) | ratio |")
    print("| --- | ---: | ---: |")
    print(f"| in-process training, B = {args.samples} (with the Adam step) | {med(trained):.4f} "
          f"| {med(whole) / med(trained):.2f} |")
    print(f"| in-process, B = {args.samples}, along the same θ path | {med(whole):.4f} | 1 |")
    print(f"| shard 0 alone (B = {len(shards[0])}) | {med(alone):.4f} | "
          f"{med(whole) / med(alone):.2f} |")
    print(f"| both shards together, slower of the two | {med(together):.4f} | "
          f"**{med(whole) / med(together):.2f}** |")
    print(f"\ntogether / alone (what a second process costs the first): "
          f"{med(times[0]) / med(alone):.3f} (shard 0's own time)")


if __name__ == "__main__":
    main()
