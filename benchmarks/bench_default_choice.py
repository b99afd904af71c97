"""Which solver combination runs the default job fastest: the default `hyperkrylov` job
(MNIST inpainting, 24-filter FoE, 40 Adam steps of B = 4) under each candidate's
overrides, side by side in one run.

    python benchmarks/bench_default_choice.py [--rounds 3] [--candidates a b ...]
        [--extra key=value ...]

Each job runs in its own fresh process (tracking disabled, no checkpoint, no progress
bar; the figures are drawn as in every run), the candidates one after another in each
round, so all see the same machine load.  Per job: wall and process CPU seconds of the
run (imports excluded), the outer steps' own seconds (``step_time``: lower level,
hypergradient, baseline), the final upper loss, and deterministic counts summed over the
run (Krylov iterations, Newton/L-BFGS iterations, HVPs, operator passes).  Prints medians
over rounds and each candidate's ratios to the first candidate (per-round ratios, median),
with the load average before each round and the BLAS thread count.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# name -> overrides of the default config (the first is the reference of the ratios)
CANDIDATES: dict[str, list[str]] = {
    name: [f"recycle={recycle}", f"solver.lower.name={lower}",
           f"solver.preconditioner={'fft' if 'M' in extras else 'none'}",
           f"solver.lower.preconditioner={'fft' if 'lowerM' in extras else 'none'}"]
    for name, recycle, lower, extras in (
        ("ritz", "ritz", "newton_krylov", ()),  # the previous default
        ("none", "none", "newton_krylov", ()),
        ("auto", "auto", "newton_krylov", ()),
        ("lbfgs", "ritz", "lbfgs", ()),
        ("ritz+lowerM", "ritz", "newton_krylov", ("lowerM",)),
        ("none+lowerM", "none", "newton_krylov", ("lowerM",)),
        ("ritz+M", "ritz", "newton_krylov", ("M",)),
        ("none+M", "none", "newton_krylov", ("M",)),
        ("auto+M+lowerM", "auto", "newton_krylov", ("M", "lowerM")),
        ("none+M+lowerM", "none", "newton_krylov", ("M", "lowerM")),  # = this default
    )
}
COUNTS = ("krylov_iterations", "lower_iterations", "hvp", "operator_passes")


def job(overrides: list[str]) -> None:
    """Run the default job with ``overrides`` in a temporary folder; print one JSON line."""
    from hydra import compose, initialize_config_module
    from threadpoolctl import threadpool_info

    from framework.experiment.runner import run

    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "tracking=disabled", "checkpoint=off", "progress=false", *overrides])
    with tempfile.TemporaryDirectory() as folder:
        t0, c0 = time.perf_counter(), time.process_time()
        summary = run(cfg, output_dir=folder)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    blas = ",".join(f"{i['internal_api']} {i['num_threads']}" for i in threadpool_info())
    print(json.dumps({"wall": wall, "cpu": cpu, "loss": summary.final_loss, "blas": blas,
                      **{k: summary.cumulative.get(k, 0.0) for k in (*COUNTS, "step_time")}}))


def _run(overrides: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's packages
    out = subprocess.run([sys.executable, __file__, "--job", json.dumps(overrides)], cwd=ROOT,
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--candidates", nargs="+", choices=tuple(CANDIDATES),
                        default=list(CANDIDATES))
    parser.add_argument("--extra", nargs="*", default=[],
                        help="overrides added to every candidate (e.g. outer.batch_size=16)")
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        job(json.loads(args.job))
        return
    print(f"python {' '.join(sys.argv)}  (OPENBLAS_NUM_THREADS="
          f"{os.environ['OPENBLAS_NUM_THREADS']})")
    results: dict[str, list[dict]] = {name: [] for name in args.candidates}
    for r in range(args.rounds):
        print(f"round {r + 1}: load average {os.getloadavg()[0]:.2f}", flush=True)
        for name in args.candidates:
            results[name].append(_run([*CANDIDATES[name], *args.extra]))
            x = results[name][-1]
            print(f"  {name:14s} wall {x['wall']:6.2f} s  cpu {x['cpu']:6.2f} s  steps "
                  f"{x['step_time']:6.2f} s  loss {x['loss']:.6g}  ({x['blas']})", flush=True)
    ref = args.candidates[0]
    print(f"\nmedians over {args.rounds} rounds; ratios: medians of per-round ratios to {ref}")
    print("| candidate | overrides | wall s | steps s | wall / ref | steps / ref | cpu / ref "
          "| " + " | ".join(COUNTS) + " | final loss |")
    print("|" + " --- |" * 2 + " ---: |" * (6 + len(COUNTS)) + " --- |")
    for name in args.candidates:
        rows = results[name]

        def ratio(key: str, rows: list[dict] = rows) -> float:
            return statistics.median(a[key] / b[key]
                                     for a, b in zip(rows, results[ref], strict=True))

        counts = " | ".join(f"{statistics.median(x[k] for x in rows):.0f}" for k in COUNTS)
        losses = sorted({f"{x['loss']:.6g}" for x in rows})
        print(f"| {name} | {' '.join(CANDIDATES[name])} | "
              f"{statistics.median(x['wall'] for x in rows):.2f} | "
              f"{statistics.median(x['step_time'] for x in rows):.2f} | {ratio('wall'):.3f} | "
              f"{ratio('step_time'):.3f} | {ratio('cpu'):.3f} | {counts} | "
              f"{', '.join(losses)} |")


if __name__ == "__main__":
    main()
