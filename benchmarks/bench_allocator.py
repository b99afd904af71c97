"""What the heap's policy costs a training step of ``bsds_deblur_learn`` (NumPy, glibc).

Each mode runs in its own worker process (glibc's ``mallopt`` settings hold for a
process's life), and the workers take turns, one cold first step each per round, so
that all see the same machine load:

* ``glibc``: glibc's defaults (blocks above a dynamic threshold of at most 32 MiB come
  from ``mmap`` and are unmapped on free);
* ``threshold``: what ``backends.tune_cpu_allocator`` did before 2026-12-02, an mmap
  threshold of 32 MiB and a trim threshold of 64 MiB;
* ``no_mmap``: ``tune_cpu_allocator`` now (``M_MMAP_MAX`` = 0, trim beyond 2 GiB).

A step is the engine's cold evaluation of the preset's θ₀ on the first B training crops
(L-BFGS lower level to ``gtol`` 1e-4, unpreconditioned MINRES for the hypergradient):
what the first step of ``hyperkrylov experiment=bsds_deblur_learn
problem.num_samples=B`` pays before its optimiser moves.  Prints per mode the best and
median wall seconds over rounds, the process's CPU and kernel (system) seconds and
minor page faults of its best round, the lower level's iterations and f + ∇f, and the
upper loss (equal bits across modes: the heap changes no arithmetic).

    python benchmarks/bench_allocator.py --data ../shared/data/bsds300 [--batches 16 64]
        [--rounds 2]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import ctypes
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = ("glibc", "threshold", "no_mmap")
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "bsds300"


def worker(mode: str, batch: int, data: str) -> None:
    """Set the heap's policy of ``mode``, build the preset's samples and engine; answer one
    JSON line per line read (one cold evaluation each)."""
    sys.path.insert(0, str(ROOT))
    from hydra import compose, initialize_config_dir

    from backends import get_backend, tune_cpu_allocator
    from framework.experiment.config import validate
    from framework.experiment.engine_setup import make_engine
    from problems.factory import build_problems

    if mode == "threshold":
        mallopt = ctypes.CDLL(None).mallopt
        mallopt(-3, 32 * 1024 * 1024)  # M_MMAP_THRESHOLD
        mallopt(-1, 64 * 1024 * 1024)  # M_TRIM_THRESHOLD
    elif mode == "no_mmap":
        assert tune_cpu_allocator()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = validate(compose(config_name="config", overrides=[
            "experiment=bsds_deblur_learn", f"problem.data_path={data}",
            f"problem.num_samples={batch}"]))
    backend = get_backend("numpy")
    problem_set = build_problems(cfg.problem, backend, cfg.seed)
    theta = backend.asarray(problem_set.theta0)
    print(json.dumps({"ready": True}), flush=True)
    for _ in sys.stdin:
        engine = make_engine(problem_set, cfg, backend)  # cold: lower solves from the data
        usage0, c0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.process_time(), \
            time.perf_counter()
        result = engine.evaluate(theta)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        usage = resource.getrusage(resource.RUSAGE_SELF)
        m = result.metrics()
        print(json.dumps({
            "s": seconds, "cpu": cpu, "sys": usage.ru_stime - usage0.ru_stime,
            "faults": usage.ru_minflt - usage0.ru_minflt, "loss": result.loss.hex(),
            "iterations": m["lower_iterations"], "evals": m["lower_grad_evals"],
        }), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), args.data)
        return
    print("command:", " ".join([sys.executable, *sys.argv]),
          f"(OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']})")
    for batch in args.batches:
        procs = {mode: subprocess.Popen(
            [sys.executable, __file__, "--data", args.data, "--worker", mode, str(batch)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for mode in MODES}
        for p in procs.values():
            assert json.loads(p.stdout.readline())["ready"]
        rows: dict[str, list[dict]] = {mode: [] for mode in MODES}
        for _ in range(args.rounds):
            for mode, p in procs.items():  # in turn: every mode sees the same load
                p.stdin.write("step\n")
                p.stdin.flush()
                rows[mode].append(json.loads(p.stdout.readline()))
        for p in procs.values():
            p.stdin.close()
            p.wait()
        print(f"\nB = {batch} crops, cold first step of the preset, {args.rounds} rounds")
        print(f"{'mode':<10} {'best s':>7} {'median s':>9} {'cpu s':>7} {'sys s':>6} "
              f"{'faults':>8} {'iters':>6} {'f+∇f':>6} {'vs glibc':>9}  loss")
        base = min(r["s"] for r in rows["glibc"])
        for mode in MODES:
            best = min(rows[mode], key=lambda r: r["s"])
            median = statistics.median(r["s"] for r in rows[mode])
            print(f"{mode:<10} {best['s']:>7.2f} {median:>9.2f} "
                  f"{best['cpu']:>7.2f} {best['sys']:>6.2f} {best['faults']:>8d} "
                  f"{best['iterations']:>6.0f} {best['evals']:>6.0f} {best['s'] / base:>8.2f}×  "
                  f"{float.fromhex(best['loss']):.15f}")
        same = len({r["loss"] for mode in MODES for r in rows[mode]}) == 1
        print(f"upper loss bit-equal across modes and rounds: {same}")


if __name__ == "__main__":
    main()
