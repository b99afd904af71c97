"""Issue 12's "results unchanged" check: the default job and the paper presets' re-solve
totals of this tree against tag ``pre-redesign``, side by side in one run.

Every job is the tree's own app run as a subprocess (cwd and PYTHONPATH = the tree: the
tag in a temporary git worktree, ``python -m framework.app``; this tree,
``python -m framework.experiment.app``), each in its own empty folder under one temporary
directory, ``OPENBLAS_NUM_THREADS=1``:

* default job: the tag's plain default (``tracking=disabled``) against this tree's default
  with the tag's solvers (``solver.lower.name=lbfgs recycle=ritz``, no preconditioners);
  compared: every per-step metric
  both write to ``checkpoint.npz`` (its ``history``; timings left out), the per-system
  Krylov iterations (``per_sample``) and ``theta.npz``.  This tree's own default (inexact
  Newton–Krylov lower level, FFT preconditioners, no recycling: deliberate changes of issue
  17) is run and shown, not compared;
  the tag's ``*_passes`` were per-sample formulas (its measured passes were
  ``batch_passes``, compared with this tree's ``operator_passes``): shown, not compared;
* paper preset ``paper_mnist_inpainting_small``: recorded once by the tag (``task=record``),
  the same ``sequence.npz`` copied into one folder per tree (each tree computes its own
  reference hypergradients, cached next to the copy), then re-solved by each tree with
  ``method=none,ritz_s,harmonic_ritz,rgen_l_r,rgen_l_l,rgen_l_r_nsc`` (a ``-m`` sweep).  A
  re-solve writes its figures only to the tracking store, so each tree logs to its own
  SQLite MLflow store (``MLFLOW_TRACKING_URI``), read back with ``MlflowClient``; compared:
  every per-system metric and every total, and the cached references.

Counts must be identical, real numbers equal to 1e-10 relative (NaN = NaN; θ and the
references as vectors, ‖a − b‖/‖a‖).  Prints one
table (quantity, old, new, max relative difference, equal?; per-step/per-system series
show their sum Σ or last value) and a last line "all equal" or the differences.  Exit
status 0 either way.

    python benchmarks/bench_unchanged_totals.py [--tag pre-redesign]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import math
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.trees import ROOT, Tree, checkout

RTOL = 1e-10
APPS = {"old": "framework.app", "new": "framework.experiment.app"}
CHECKPOINT_MODULES = {"old": "framework.checkpoint", "new": "framework.experiment.checkpoint"}
PRESET = "experiment=paper_mnist_inpainting_small"
METHODS = ("none", "ritz_s", "harmonic_ritz", "rgen_l_r", "rgen_l_l", "rgen_l_r_nsc")
# Wall-clock figures: they differ from run to run in any tree.
TIMINGS = ("step_time", "solve_time", "time_")
# The tag's batched engine logged as hvp/jac_t/operator_passes what each sample would have
# spent alone (a formula) and the batch's measured passes as batch_passes; this tree logs
# the batch's measured passes as hvp/jac_t/operator_passes.
REDEFINED = ("hvp_passes", "jac_t_passes", "operator_passes")
RENAMED = {"batch_passes": "operator_passes"}


@dataclass(frozen=True)
class Row:
    quantity: str
    old: str
    new: str
    diff: str
    equal: bool | None  # None: shown, not compared


OLD_DEFAULT_SOLVERS = ("solver.lower.name=lbfgs", "recycle=ritz", "solver.preconditioner=none",
                       "solver.lower.preconditioner=none")


def app(tree: str, root: str, folder: Path, *overrides: str, store: Path | None = None,
        check: bool = True) -> subprocess.CompletedProcess:
    """One job of ``tree``'s app (cwd ``root``), its output kept; fails loudly unless
    ``check`` is false."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "PYTHONPATH": root}
    env.pop("MLFLOW_TRACKING_URI", None)
    if store is not None:
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{store}"
    folder_key = "hydra.sweep.dir" if "-m" in overrides else "hydra.run.dir"
    command = [sys.executable, "-m", APPS[tree], *overrides, f"{folder_key}={folder}",
               "progress=false"]
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
    print(f"  {tree}: {' '.join(overrides)}  ({time.perf_counter() - started:.1f} s, "
          f"exit {proc.returncode})", flush=True)
    if check and proc.returncode:
        raise SystemExit(f"{tree} job failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def _text(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.12g}"


def _relative_differences(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a − b| / max(|a|, |b|) elementwise; 0 where equal (NaN = NaN), inf for one NaN."""
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.where(a == b, 0.0, np.abs(a - b) / np.maximum(np.abs(a), np.abs(b)))
    rel[np.isnan(a) & np.isnan(b)] = 0.0
    rel[np.isnan(rel)] = np.inf
    return rel


def _integral(v: np.ndarray) -> bool:
    finite = v[np.isfinite(v)]
    return bool(np.all(finite == np.round(finite)))


def _shown(values: object) -> str:
    v = np.asarray(values, dtype=float).ravel()
    return _text(np.nansum(v)) if _integral(v) else _text(v[-1])


def compare(quantity: str, old: object, new: object, *, normwise: bool = False) -> Row:
    """Row of two values or series: counts (all integers) exactly, reals to ``RTOL``
    (elementwise, or ‖a − b‖/‖a‖ for a ``normwise`` vector)."""
    if old is None or new is None:
        return Row(quantity, "absent" if old is None else _shown(old),
                   "absent" if new is None else _shown(new), "", False)
    a, b = np.asarray(old, dtype=float).ravel(), np.asarray(new, dtype=float).ravel()
    if a.shape != b.shape:
        return Row(quantity, f"{a.size} values", f"{b.size} values", "shape", False)
    rel = _relative_differences(a, b)
    worst = float(rel.max()) if rel.size else 0.0
    if normwise:
        quantity += " ‖a−b‖/‖a‖"
        worst = float(np.linalg.norm(a - b) / np.linalg.norm(a))
    counts = _integral(a) and _integral(b)
    if a.size <= 1:
        label, show = quantity, lambda v: _text(v[-1]) if v.size else "-"
    elif counts:
        label, show = f"{quantity} (Σ {a.size})", lambda v: _text(np.nansum(v))
    else:
        label, show = f"{quantity} (last of {a.size})", lambda v: _text(v[-1])
    return Row(label, show(a), show(b), f"{worst:.1e}", worst == 0.0 if counts else worst <= RTOL)


def _timing(key: str) -> bool:
    return any(t in key for t in TIMINGS)


def _redefined(quantity: str, old: object, new: object) -> Row:
    label = f"{quantity} [old: per-sample formula; new: measured]"
    return Row(label, _shown(old), _shown(new), "", None)


def compare_default(trees: dict[str, Tree], runs: dict[str, Path]) -> list[Row]:
    """Every per-step metric of both checkpoints, the per-system iterations and θ."""
    state = {t: trees[t].load(CHECKPOINT_MODULES[t]).load(runs[t] / "checkpoint.npz")
             for t in ("old", "new")}
    series = {t: {k: [h.get(k, math.nan) for h in state[t]["history"]]
                  for k in state[t]["history"][0]} for t in state}
    keys = sorted(k for k in series["old"].keys() | series["new"].keys()
                  if k != "step" and not k.startswith("cumulative_") and not _timing(k))
    rows = [compare("steps", len(state["old"]["history"]), len(state["new"]["history"]))]
    for k in keys:
        old, new = series["old"].get(k), series["new"].get(RENAMED.get(k, k))
        if k in RENAMED:
            rows.append(compare(f"{k} (old) = {RENAMED[k]} (new)", old, new))
        elif k in REDEFINED:
            rows.append(_redefined(k, old, new))
        else:
            rows.append(compare(k, old, new))
    totals = {t: state[t]["cumulative"] for t in state}
    for k in sorted(totals["old"].keys() | totals["new"].keys()):
        old, new = totals["old"].get(k), totals["new"].get(k)
        if k in REDEFINED:
            rows.append(_redefined(f"checkpoint total {k}", old, new))
        elif not _timing(k):
            rows.append(compare(f"checkpoint total {k}", old, new))
    per_sample = {t: np.asarray(state[t]["per_sample"], dtype=float) for t in state}
    rows.append(compare("per-system Krylov iterations", per_sample["old"][:, 2],
                        per_sample["new"][:, 2]))
    rows.append(compare("per-system shadow iterations", per_sample["old"][:, 3],
                        per_sample["new"][:, 3]))
    thetas = {t: np.load(runs[t] / "theta.npz")["theta"] for t in state}
    rows.append(compare("theta.npz", thetas["old"], thetas["new"], normwise=True))
    return rows


def resolve_metrics(store: Path) -> dict[str, dict[str, list[float]]]:
    """method → metric → per-system values (step order) of every re-solve run in ``store``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("hyperkrylov")
    out = {}
    for run in client.search_runs([experiment.experiment_id]):
        overrides = run.data.tags.get("hyperkrylov.overrides", "")
        methods = [o.split("=", 1)[1] for o in overrides.split() if o.startswith("method=")]
        if not methods:  # the sweep's parent run (new tree)
            continue
        method = methods[0]
        out[method] = {
            key: [m.value for m in sorted(client.get_metric_history(run.info.run_id, key),
                                          key=lambda m: m.step)]
            for key in run.data.metrics if not _timing(key) and not key.startswith("cumulative_")
        }
    return out


def compare_resolve(trees: dict[str, Tree], stores: dict[str, Path],
                    sequences: dict[str, Path]) -> list[Row]:
    """Per method: every per-system metric and total; then the cached references."""
    metrics = {t: resolve_metrics(stores[t]) for t in stores}
    rows = []
    for method in METHODS:
        old, new = metrics["old"].get(method, {}), metrics["new"].get(method, {})
        rows += [compare(f"{method}: {k}", old.get(k), new.get(k))
                 for k in sorted(old.keys() | new.keys())]
    refs = {"old": dict(np.load(sequences["old"].with_name("sequence.refs.npz"))),
            "new": trees["new"].load(CHECKPOINT_MODULES["new"]).load(
                sequences["new"].with_name("sequence.refs.npz"))}
    rows.append(compare("reference hypergradients (sample_0)", refs["old"]["sample_0"],
                        refs["new"]["sample_0"], normwise=True))
    return rows


def print_table(title: str, rows: list[Row]) -> None:
    width = max(len(r.quantity) for r in rows)
    print(f"\n{title}")
    print(f"{'quantity':<{width}}  {'old':>20}  {'new':>20}  {'max rel diff':>12}  equal?")
    for r in rows:
        mark = "info" if r.equal is None else ("yes" if r.equal else "NO  <<<<<<<<<<")
        print(f"{r.quantity:<{width}}  {r.old:>20}  {r.new:>20}  {r.diff:>12}  {mark}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tag", default="pre-redesign")
    args = parser.parse_args()
    started = time.perf_counter()
    print("command:", " ".join([sys.executable, *sys.argv]))
    print(f"old = tag {args.tag} ({APPS['old']}), new = {ROOT} ({APPS['new']}); "
          f"OPENBLAS_NUM_THREADS=1; counts exact, reals to {RTOL:g} relative")
    with checkout(args.tag) as old_root, tempfile.TemporaryDirectory() as tmp:
        roots, work = {"old": old_root, "new": ROOT}, Path(tmp)
        trees = {t: Tree(r) for t, r in roots.items()}
        print("default job:")
        runs = {"old": work / "old-default", "new": work / "new-default-lbfgs",
                "new-newton": work / "new-default"}
        app("old", old_root, runs["old"], "tracking=disabled")
        app("new", ROOT, runs["new"], "tracking=disabled", *OLD_DEFAULT_SOLVERS)
        app("new", ROOT, runs["new-newton"], "tracking=disabled")
        default_rows = compare_default(trees, runs)
        newton = trees["new"].load(CHECKPOINT_MODULES["new"]).load(
            runs["new-newton"] / "checkpoint.npz")
        default_rows += [
            Row(f"[new default] {k}", "-", _text(newton["cumulative"][k]), "",
                None) for k in ("lower_iterations", "krylov_iterations", "hvp", "jac_t")
            if k in newton["cumulative"]]
        default_rows.append(Row("[new default] upper_loss (last)", "-",
                                _text(newton["history"][-1]["upper_loss"]), "", None))

        print(f"paper preset ({PRESET}):")
        record = work / "old-record"
        app("old", old_root, record, PRESET, "task=record", "tracking=disabled")
        sequences, stores, resolve_rows = {}, {}, []
        for tree in ("old", "new"):
            sequences[tree] = work / f"{tree}-sequence" / "sequence.npz"
            sequences[tree].parent.mkdir()
            shutil.copyfile(record / "sequence.npz", sequences[tree])
            stores[tree] = work / f"{tree}-mlflow.db"
            sweep = ["-m", PRESET, "task=resolve", f"sequence.path={sequences[tree]}",
                     f"method={','.join(METHODS)}", "tracking.sweep_id=verify"]
            proc = app(tree, roots[tree], work / f"{tree}-resolve", *sweep, store=stores[tree],
                       check=tree == "old")
            if proc.returncode:  # this tree cannot read the tag's recording: record in both
                print(f"  NEW TREE CANNOT RESOLVE THE TAG'S RECORDING:\n{proc.stderr[-2000:]}")
                resolve_rows.append(Row("new tree reads the tag's sequence.npz", "-", "no", "",
                                        False))
                app("new", ROOT, work / "new-record", PRESET, "task=record",
                    "tracking=disabled")
                shutil.copyfile(work / "new-record" / "sequence.npz", sequences[tree])
                stores[tree].unlink(missing_ok=True)
                app(tree, roots[tree], work / f"{tree}-resolve-2", *sweep, store=stores[tree])
        resolve_rows += compare_resolve(trees, stores, sequences)

    print_table("default job (old: tag default; new: the old default's solvers)", default_rows)
    print_table(f"re-solve of one recording ({PRESET}, sample 0)", resolve_rows)
    different = [r.quantity for r in default_rows + resolve_rows if r.equal is False]
    print(f"\nran {time.perf_counter() - started:.0f} s")
    shown = [r.quantity for r in default_rows + resolve_rows if r.equal is None]
    print(f"not compared ({len(shown)}, marked info): " + "; ".join(shown))
    print("all equal" if not different else
          f"DIFFERENCES ({len(different)}): " + "; ".join(different))


if __name__ == "__main__":
    main()
