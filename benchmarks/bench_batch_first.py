"""Per-iteration cost of the batch-first rminres against the pre-redesign solvers.

Side by side in one run, alternating: the new ``rminres`` at B = 1 (a 1-D right-hand
side) against the old unbatched ``rminres``, and at B = 16 against the old
``rminres_batched``, from tag ``pre-redesign`` (a temporary git worktree, imported in the
same process by ``benchmarks.trees``: old and new alternate under the same load).
Operators:

* ``foe``: the linearised FoE Hessian of the first embedded MNIST digit (28×28,
  inpainting 50 %, 24 DCT 5×5 filters, Lorentzian experts; as benchmarks/bench_hvp.py);
* ``laplace``: the 2-D Laplacian (5-point) plus a diagonal U(0.01, 0.1), n = 128² = 16,384
  (as benchmarks/bench_minres_vs_scipy.py), a SciPy CSR matrix.

B = 16 solves 16 right-hand sides against the same operator (one block application per
pass).  Each solve runs to rtol = 1e-8 (maxiter 2000); µs/iteration = wall time / passes,
best of ``--repeats`` × ``--rounds``.  Prints iterations (which must agree at B = 1),
µs/iteration, the ratio new/old, each tree's operator alone (µs per pass: the two trees'
problem code differ too) and the BLAS thread count.

    python benchmarks/bench_batch_first.py [--repeats 5] [--rounds 6] [--tag pre-redesign]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.trees import ROOT, Tree, blas_threads, checkout

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


def solver(case: str, batch: int, old: bool) -> tuple:
    """(solve, apply) closures for the active tree: ``solve()`` runs one solve and
    returns (iterations, passes); ``apply()`` applies the operator to one block."""
    import numpy as np

    from framework.krylov import rminres

    A, n = _operator(case)
    b = np.random.default_rng(1).standard_normal((batch, n))
    if batch == 1:
        def solve() -> tuple:
            r = rminres(A, b[0], rtol=RTOL, maxiter=MAXITER, true_residual=False)
            return r.iterations, r.iterations
        return solve, (lambda: A(b[0])), n
    rows = lambda V: A(V.T).T  # noqa: E731  one block application per pass
    if old:
        from framework.krylov.batched import rminres_batched as batched
    else:
        batched = rminres

    def solve() -> tuple:
        r = batched(rows, b, rtol=RTOL, maxiter=MAXITER)
        return list(r.iterations), max(r.iterations)
    return solve, (lambda: rows(b)), n


def _best(call: Any, repeats: int) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = call()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _show(iterations: int | list[int]) -> str:
    if isinstance(iterations, int):
        return str(iterations)
    return f"max {max(iterations)}, sum {sum(iterations)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="solves per round (best)")
    parser.add_argument("--rounds", type=int, default=6, help="alternating old/new rounds")
    parser.add_argument("--tag", default="pre-redesign")
    args = parser.parse_args()
    print("command:", " ".join([sys.executable, *sys.argv]))
    print(f"BLAS (threadpoolctl): {blas_threads()}; rtol {RTOL}; best of {args.repeats} solves "
          f"x {args.rounds} alternating rounds, both trees in one process; old = tag {args.tag}")
    print(f"{'case':>8} {'B':>3} {'n':>6} {'iterations old':>16} {'iterations new':>16} "
          f"{'old µs/it':>10} {'new µs/it':>10} {'new/old':>8} {'op old':>8} {'op new':>8}")
    with checkout(args.tag) as old_root:
        trees = {"old": Tree(old_root), "new": Tree(ROOT)}
        for case in ("foe", "laplace"):
            for batch in (1, BATCH):
                built = {}
                for name, tree in trees.items():
                    with tree.active():
                        built[name] = solver(case, batch, name == "old")
                        built[name][0]()  # first call: imports, caches
                best = {name: [float("inf")] * 2 for name in trees}
                its = {}
                for _ in range(args.rounds):
                    for name in trees:
                        solve, apply, n = built[name]
                        t, (its[name], passes) = _best(solve, args.repeats)
                        op, _ = _best(apply, 3 * args.repeats)
                        best[name] = [min(best[name][0], t / passes * 1e6),
                                      min(best[name][1], op * 1e6)]
                (o, o_op), (w, w_op) = best["old"], best["new"]
                same = "same" if its["old"] == its["new"] else "DIFFERENT"
                print(f"{case:>8} {batch:>3} {n:>6} {_show(its['old']):>16} "
                      f"{_show(its['new']):>16} {o:>10.1f} {w:>10.1f} {w / o:>8.3f} "
                      f"{o_op:>8.1f} {w_op:>8.1f}  iterations {same}")


if __name__ == "__main__":
    main()
