"""The one engine's mini-batch step: B samples together vs each alone, and vs the
pre-redesign batched engine, side by side in one run.

B MNIST inpainting samples (embedded digits, 28×28, 50 % removed, 5 % noise), FoE with 24
DCT 5×5 Lorentzian filters, Ritz recycling (k configurable), MINRES rtol 1e-3, L-BFGS
gtol 1e-6, Adam steps from the same θ.  Three runs, each in its own worker process,
stepped in turn (old, together, alone, old, …) so that all see the same machine load:

* ``old``: ``BatchedBilevelEngine`` of tag ``pre-redesign`` (imported in a subprocess whose
  cwd is a temporary git worktree of the tag);
* ``together``: this tree's ``BilevelEngine.evaluate(θ)`` on all B samples (one batch);
* ``alone``: the same engine class evaluating the B samples one at a time (B batches of one).

Prints ms/step (median of steps 2..), per-step Krylov and L-BFGS iterations, HVP and Jᵀ
applications (per-sample sums; ``old`` reports its formula counts), measured passes, the
ratios (wall time, and the process's CPU time, which other jobs on the machine disturb
less) and the BLAS thread count.

    python benchmarks/bench_batched_engine.py [--batch 16] [--steps 6] [--k 5] [--tag pre-redesign]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time

MODES = ("old", "together", "alone")


def _engine(mode: str, problems, cfg, be):
    if mode == "old":
        from framework.batched_engine import BatchedBilevelEngine

        return BatchedBilevelEngine(problems, cfg, backend=be)
    from framework.bilevel.engine import BilevelEngine

    return BilevelEngine(problems, cfg, backend=be)


def worker(mode: str, batch: int, k: int) -> None:
    """Build the run of ``mode`` from the cwd's tree; answer one JSON line per 'step'."""
    sys.path.insert(0, os.getcwd())
    from backends import get_backend, tune_cpu_allocator

    if mode == "old":
        from framework.engine import EngineConfig
        from framework.outer import Adam
    else:
        from framework.bilevel.engine import EngineConfig
        from framework.optim import Adam
    from framework.krylov.recycle import RecycleConfig
    from framework.krylov.stopping import StopConfig
    from problems import FieldsOfExperts, ImagingProblem, Inpainting, load_embedded_mnist
    from problems.foe import dct_filters, initial_theta

    tune_cpu_allocator()
    be = get_backend("numpy")
    reg = FieldsOfExperts((28, 28), 5, 24, expert="lorentzian")
    problems = [ImagingProblem.from_image(img, be, Inpainting((28, 28), 0.5, seed=i), reg,
                                          noise_level=0.05, seed=i)
                for i, img in enumerate(load_embedded_mnist().images[:batch])]
    cfg = EngineConfig(recycle=RecycleConfig("ritz", k), stop=StopConfig(rtol=1e-3),
                       lower_gtol=1e-6)
    engine = _engine(mode, problems, cfg, be)
    theta, adam = be.asarray(initial_theta(dct_filters(5), -1.0)), Adam(lr=1e-2)
    groups = [[j] for j in range(batch)] if mode == "alone" else [list(range(batch))]
    print(json.dumps({"ready": True}), flush=True)
    for _ in sys.stdin:
        t0, c0 = time.perf_counter(), time.process_time()
        results = [engine.evaluate(theta, g) for g in groups]
        grad = sum(r.grad for r in results) / len(results)
        theta = adam.step(theta, grad).theta
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        metrics = [r.metrics() for r in results]
        total = lambda key, ms=metrics: sum(m.get(key, 0.0) for m in ms)  # noqa: E731
        passes = total("batch_passes") if mode == "old" else total("operator_passes")
        print(json.dumps({
            "ms": seconds * 1e3, "cpu_ms": cpu * 1e3,
            "loss": sum(r.loss for r in results) / len(results),
            "krylov": total("krylov_iterations"), "lower": total("lower_iterations"),
            "hvp": total("hvp"), "jac_t": total("jac_t"), "passes": passes,
        }), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--tag", default="pre-redesign")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), int(args.worker[2]))
        return
    import numpy  # noqa: F401  (loads the BLAS that threadpoolctl reports)
    from threadpoolctl import threadpool_info

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    blas = [(i.get("internal_api"), i.get("num_threads")) for i in threadpool_info()
            if i.get("user_api") == "blas"]
    print("command:", " ".join([sys.executable, *sys.argv]))
    print(f"inputs: B = {args.batch} MNIST inpainting samples, FoE 24 DCT 5×5 Lorentzian, "
          f"Ritz k = {args.k}, MINRES rtol 1e-3, L-BFGS gtol 1e-6, {args.steps} Adam steps "
          f"(median of steps 2..), runs stepped in turn; BLAS (threadpoolctl): {blas}; "
          f"old = BatchedBilevelEngine of tag {args.tag}")
    with tempfile.TemporaryDirectory() as tmp:
        old_tree = os.path.join(tmp, "old")
        subprocess.run(["git", "-C", root, "worktree", "add", "--detach", "-q", old_tree,
                        args.tag], check=True)
        procs = {}
        try:
            for mode in MODES:
                procs[mode] = subprocess.Popen(
                    [sys.executable, os.path.abspath(__file__), "--worker", mode,
                     str(args.batch), str(args.k)],
                    cwd=old_tree if mode == "old" else root, stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, text=True)
                json.loads(procs[mode].stdout.readline())
            steps = {mode: [] for mode in MODES}
            for _ in range(args.steps):
                for mode in MODES:
                    procs[mode].stdin.write("step\n")
                    procs[mode].stdin.flush()
                    steps[mode].append(json.loads(procs[mode].stdout.readline()))
        finally:
            for p in procs.values():
                p.stdin.close()
                p.wait()
            subprocess.run(["git", "-C", root, "worktree", "remove", "--force", old_tree],
                           check=True)
    ms = {m: statistics.median(s["ms"] for s in steps[m][1:]) for m in MODES}
    print(f"{'run':<9} {'ms/step':>9} {'Krylov it':>10} {'L-BFGS it':>10} {'HVP':>7} "
          f"{'Jᵀ':>5} {'passes':>7} {'loss (last step)':>18}   (counts: sums over all steps)")
    for m in MODES:
        s = steps[m]
        tot = lambda key, s=s: int(sum(x[key] for x in s))  # noqa: E731
        print(f"{m:<9} {ms[m]:>9.1f} {tot('krylov'):>10} {tot('lower'):>10} {tot('hvp'):>7} "
              f"{tot('jac_t'):>5} {tot('passes'):>7} {s[-1]['loss']:>18.12f}")
    ratio = lambda a, b, key="ms": statistics.median(  # noqa: E731
        x[key] / y[key] for x, y in zip(steps[a][1:], steps[b][1:], strict=True))
    print(f"together/old (per-step ratio, median): {ratio('together', 'old'):.3f}× wall, "
          f"{ratio('together', 'old', 'cpu_ms'):.3f}× CPU time; "
          f"alone/together: {ratio('alone', 'together'):.2f}×")


if __name__ == "__main__":
    main()
