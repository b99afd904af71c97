"""Per-iteration cost of the batch-first rminres against the pre-redesign solvers.

Side by side in one run, alternating: the new ``rminres`` at B = 1 (a 1-D right-hand
side) against the old unbatched ``rminres``, and at B = 16 against the old
``rminres_batched``, from tag ``pre-redesign`` (imported in a subprocess whose cwd is a
temporary git worktree of the tag).  Operators:

* ``foe``: the linearised FoE Hessian of the first embedded MNIST digit (28×28,
  inpainting 50 %, 24 DCT 5×5 filters, Lorentzian experts; as benchmarks/bench_hvp.py);
* ``laplace``: the 2-D Laplacian (5-point) plus a diagonal U(0.01, 0.1), n = 128² = 16,384
  (as benchmarks/bench_minres_vs_scipy.py), a SciPy CSR matrix.

B = 16 solves 16 right-hand sides against the same operator (one block application per
pass).  Each solve runs to rtol = 1e-8 (maxiter 2000); µs/iteration = wall time / passes,
best of ``--repeats``.  Prints iterations (which must agree at B = 1), µs/iteration, the
ratio new/old and the BLAS thread count.

    python benchmarks/bench_batch_first.py [--repeats 7] [--tag pre-redesign]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import subprocess
import sys
import tempfile
import time

RTOL, MAXITER, BATCH = 1e-8, 2000, 16


def _operator(case: str):
    """(1-D operator, n) for ``case``, built from the cwd's tree."""
    import numpy as np

    if case == "laplace":
        from benchmarks.bench_minres_vs_scipy import laplacian_plus_diagonal

        A = laplacian_plus_diagonal(128)
        return (lambda v: A @ v), A.shape[0]
    from backends import get_backend
    from problems.datasets import load_embedded_mnist
    from problems.foe import FieldsOfExperts, dct_filters, initial_theta
    from problems.imaging import ImagingProblem
    from problems.operators import Inpainting

    backend = get_backend("numpy")
    image = load_embedded_mnist().images[0]
    problem = ImagingProblem.from_image(
        image, backend, Inpainting(image.shape, 0.5, seed=0),
        FieldsOfExperts(image.shape, 5, 24, expert="lorentzian"), noise_level=0.05, seed=0)
    theta = backend.asarray(initial_theta(dct_filters(5), -1.0))
    lin = problem.linearize(problem.y, theta)
    return (lambda v: np.asarray(lin(v))), problem.n


def worker(case: str, batch: int, old: bool, repeats: int) -> dict:
    """Time the solver of the cwd's tree; returns iterations and best µs per pass."""
    sys.path.insert(0, os.getcwd())
    import numpy as np

    from framework.krylov import rminres

    A, n = _operator(case)
    b = np.random.default_rng(1).standard_normal((batch, n))
    if batch == 1:
        solve = lambda: rminres(A, b[0], rtol=RTOL, maxiter=MAXITER, true_residual=False)  # noqa: E731
    else:
        rows = lambda V: A(V.T).T  # noqa: E731  one block application per pass
        if old:
            from framework.krylov.batched import rminres_batched as batched
        else:
            batched = rminres
        solve = lambda: batched(rows, b, rtol=RTOL, maxiter=MAXITER)  # noqa: E731
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = solve()
        best = min(best, time.perf_counter() - t0)
    its = result.iterations if batch == 1 else list(result.iterations)
    passes = its if batch == 1 else max(its)
    return {"iterations": its, "us_per_iteration": best / passes * 1e6, "n": n}


def _show(iterations: int | list[int]) -> str:
    if isinstance(iterations, int):
        return str(iterations)
    return f"max {max(iterations)}, sum {sum(iterations)}"


def _run(cwd: str, case: str, batch: int, old: bool, repeats: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", case, str(batch),
           "old" if old else "new", str(repeats)]
    out = subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="solves per subprocess")
    parser.add_argument("--rounds", type=int, default=3, help="alternating old/new rounds")
    parser.add_argument("--tag", default="pre-redesign")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        case, batch, which, repeats = args.worker
        print(json.dumps(worker(case, int(batch), which == "old", int(repeats))))
        return
    import numpy  # noqa: F401  (loads the BLAS that threadpoolctl reports)
    from threadpoolctl import threadpool_info

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    print("command:", " ".join([sys.executable, *sys.argv]))
    blas = [(i.get("internal_api"), i.get("num_threads")) for i in threadpool_info()
            if i.get("user_api") == "blas"]
    print(f"BLAS (threadpoolctl): {blas}; rtol {RTOL}, best of {args.repeats} solves x "
          f"{args.rounds} alternating rounds; old = tag {args.tag}")
    with tempfile.TemporaryDirectory() as tmp:
        old_tree = os.path.join(tmp, "old")
        subprocess.run(["git", "-C", root, "worktree", "add", "--detach", "-q", old_tree,
                        args.tag], check=True)
        try:
            print(f"{'case':>8} {'B':>3} {'n':>6} {'iterations old':>16} {'iterations new':>16} "
                  f"{'old µs/it':>10} {'new µs/it':>10} {'new/old':>8}")
            for case in ("foe", "laplace"):
                for batch in (1, BATCH):
                    old = new = None
                    for _ in range(args.rounds):
                        o = _run(old_tree, case, batch, True, args.repeats)
                        w = _run(root, case, batch, False, args.repeats)
                        if old is None or o["us_per_iteration"] < old["us_per_iteration"]:
                            old = o
                        if new is None or w["us_per_iteration"] < new["us_per_iteration"]:
                            new = w
                    io, iw = old["iterations"], new["iterations"]
                    same = "same" if io == iw else "DIFFERENT"
                    print(f"{case:>8} {batch:>3} {new['n']:>6} {_show(io):>16} {_show(iw):>16} "
                          f"{old['us_per_iteration']:>10.1f} {new['us_per_iteration']:>10.1f} "
                          f"{new['us_per_iteration'] / old['us_per_iteration']:>8.3f}  "
                          f"iterations {same}")
        finally:
            subprocess.run(["git", "-C", root, "worktree", "remove", "--force", old_tree],
                           check=True)


if __name__ == "__main__":
    main()
