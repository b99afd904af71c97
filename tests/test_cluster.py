"""Data-parallel runs on Dask (``cluster=dask_local``: a LocalCluster of worker processes)
against the in-process engine, and a worker killed mid-run.

Each shard returns its samples' hypergradients and the driver takes their mean over the
rows in index order, the in-process engine's own reduction; every per-sample solve runs on
the same samples from the same state (the engine's "batch = each alone" property), so
without recycling θ, the losses and every per-sample count are identical to the bit.
With recycling a row's arithmetic can depend on its batch: the recycle spaces are padded
to the largest dimension in the batch (a shard's may be smaller), which changes the BLAS
products' blocking at rounding level (measured: θ within 3e-17 on the quadratic, 2e-14 on
MNIST after 10 steps), so θ and losses agree to 1e-12, counts exactly.  One exception
by design: a batch in which some samples have a warm start and others none applies H to
the zero rows of the latter (one counted application each), which a worker whose part
holds only cold samples does not.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import dask
import distributed.config  # noqa: F401  (loads Dask's distributed settings)
import numpy as np
import psutil
import pytest
from hydra import compose, initialize_config_module

from framework.experiment import checkpoint, cluster, compare, names, runner
from framework.experiment.config import ConfigError, validate
from framework.experiment.runner import run
from framework.experiment.tracking import RunRecord, read_runs

QUADRATIC = ("problem=quadratic", "problem.num_samples=6", "outer.batch_size=4",
             "outer.steps=10")
MNIST = ("problem.num_samples=16", "outer.batch_size=16", "problem.num_filters=4",
         "outer.steps=10")
# per-step counts of one sample's solves (sums over the batch); passes are per worker
SAMPLE_COUNTS = ("krylov_iterations", "lower_iterations", "hvp", "jac_t",
                 "operator_applications", "baseline_krylov_iterations", "baseline_hvp",
                 "batch_size")


def _compose(*overrides: str):
    with initialize_config_module(config_module="conf", version_base="1.3"):
        return compose(config_name="config",
                       overrides=[*overrides, "tracking=disabled", "progress=false"])


def _run(tmp_path: Path, name: str, *overrides: str):
    summary = run(_compose(*overrides), output_dir=tmp_path / name)
    return summary, checkpoint.load(summary.checkpoint_path)


def _assert_same_path(local, dask, *, atol: float, loss_rtol: float = 0.0) -> None:
    """θ to ``atol``, losses of every step to ``loss_rtol``, per-sample counts identical."""
    (a, a_state), (b, b_state) = local, dask
    np.testing.assert_allclose(b.theta, a.theta, rtol=0, atol=atol)
    for at, bt in zip(a_state["history"], b_state["history"], strict=True):
        assert bt[names.UPPER_LOSS] == pytest.approx(at[names.UPPER_LOSS], rel=loss_rtol, abs=0)
        assert {k: bt.get(k) for k in SAMPLE_COUNTS} == {k: at.get(k) for k in SAMPLE_COUNTS}
    np.testing.assert_array_equal(b_state["per_sample"], a_state["per_sample"])


def _spread(state) -> bool:
    """Whether the samples of a step needed different Krylov iteration counts."""
    table = np.asarray(state["per_sample"])
    return any(len(set(table[table[:, 0] == s, 2])) > 1 for s in set(table[:, 0]))


@pytest.mark.parametrize("recycle", ["ritz", "none"])
def test_dask_local_equals_in_process_quadratic(tmp_path: Path, recycle: str) -> None:
    args = (*QUADRATIC, f"recycle={recycle}")
    local = _run(tmp_path, "local", *args)
    dask = _run(tmp_path, "dask", *args, "cluster=dask_local", "cluster.workers=2")
    assert _spread(local[1])  # samples converge at different speeds
    exact = 0.0 if recycle == "none" else 1e-12
    _assert_same_path(local, dask, atol=exact, loss_rtol=exact)
    last = dask[1]["history"][-1]
    assert last["worker_0_samples"] + last["worker_1_samples"] == 4
    assert last[names.WORKER_IMBALANCE] >= 1.0 and last[names.WORKERS_LOST] == 0


@pytest.mark.slow
@pytest.mark.parametrize("recycle", ["ritz", "none"])
def test_dask_local_equals_in_process_mnist_b16(tmp_path: Path, recycle: str) -> None:
    """The FoE run is far more sensitive to rounding than the quadratic one (θ₀ scaled by
    1 + 4e-16 moves θ by 3e-11 after 10 steps), so only equal bits per sample make equal
    paths: without recycling θ, every loss and every count identical; with recycling
    (padding, see the module doc) θ and losses to 1e-12, counts identical."""
    args = (*MNIST, f"recycle={recycle}")
    local = _run(tmp_path, "local", *args)
    dask = _run(tmp_path, "dask", *args, "cluster=dask_local", "cluster.workers=2")
    assert _spread(local[1])
    assert dask[1]["history"][0][names.UPPER_LOSS] == local[1]["history"][0][names.UPPER_LOSS]
    exact = 0.0 if recycle == "none" else 1e-12
    _assert_same_path(local, dask, atol=exact, loss_rtol=exact)


class _KillsAWorker(cluster.DaskEngine):
    """Kills the worker of shard 1 (SIGKILL to its process id) inside step ``at``, before
    the step's calls go out, and waits until the process is gone."""

    at = 4

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.steps = 0

    def evaluate(self, theta, indices):
        if self.steps == self.at:
            process = psutil.Process(self.worker_pids()[1])
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        self.steps += 1
        return super().evaluate(theta, indices)


def test_killed_worker_restored_from_checkpoint(tmp_path: Path, monkeypatch, uri) -> None:
    """Step 5 of 10 (index 4) loses a worker; its shard is re-created from the checkpoint
    of step 4, which is exactly the state it had, so the run follows the fault-free one
    (the in-process run, which a fault-free Dask run equals: the tests above).  The MLflow
    run records the loss in its metrics and tags."""
    args = (*QUADRATIC, "checkpoint.every=2")
    clean = _run(tmp_path, "clean", *args)
    monkeypatch.setattr(runner, "DaskEngine", _KillsAWorker)
    faulty = _run(tmp_path, "faulty", *args, "cluster=dask_local", "cluster.workers=2",
                  "tracking.enabled=true")
    lost = [h[names.WORKERS_LOST] for h in faulty[1]["history"]]
    assert lost == [0, 0, 0, 0, 1, 0, 0, 0, 0, 0]
    (record,) = read_runs(uri, "hyperkrylov", history_keys=[names.WORKERS_LOST])
    assert record.run_id == faulty[0].run_id and record.status == "FINISHED"
    assert record.history[names.WORKERS_LOST] == tuple((s, float(s == 4)) for s in range(10))
    assert record.tags[names.LOST_WORKERS_TAG] == "1"
    assert record.tags[names.LOST_WORKER_STEPS_TAG] == "4"
    assert faulty[1]["history"][4][names.COLD_STARTED] == 0
    _assert_same_path(clean, faulty, atol=1e-12)


def test_killed_worker_cold_started_without_checkpoint(tmp_path: Path, monkeypatch,
                                                       caplog) -> None:
    """Without a checkpoint the lost shard restarts cold.  With the lower level solved to
    gtol 1e-10 and the Hessian systems to rtol 1e-10, a warm and a cold start reach the
    same x* and w to about κ·1e-10 (κ ≤ 1e2 for these samples), so θ follows the
    fault-free run to 1e-8; the counts of the cold-started samples differ."""
    args = (*QUADRATIC, "checkpoint=off", "solver.lower.gtol=1e-10", "stop.rtol=1e-10")
    clean = run(_compose(*args), output_dir=tmp_path / "clean")
    monkeypatch.setattr(runner, "DaskEngine", _KillsAWorker)
    with caplog.at_level(logging.INFO, logger="hyperkrylov"):
        faulty = run(_compose(*args, "cluster=dask_local", "cluster.workers=2"),
                     output_dir=tmp_path / "faulty")
    assert [r.message for r in caplog.records if "worker was lost" in r.message] == [
        "a Dask worker was lost: shard 1 (samples [1, 3, 5]) re-created cold (no checkpoint "
        "yet); its part of the step is recomputed"]
    np.testing.assert_allclose(faulty.theta, clean.theta, rtol=0, atol=1e-8)
    assert faulty.cumulative[names.BATCH_SIZE] == clean.cumulative[names.BATCH_SIZE]


def test_unreachable_scheduler_is_one_line_exit_2(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "framework.experiment.app", "cluster=dask_address",
         "cluster.address=tcp://127.0.0.1:9", "tracking=disabled",
         f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1])
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "hyperkrylov: configuration error: cluster.address: no Dask scheduler answers at "
        "tcp://127.0.0.1:9 (OSError); start one (`dask scheduler`) or fix the address"]
    assert not (tmp_path / "checkpoint.npz").exists()


def test_cluster_config_checks() -> None:
    with pytest.raises(ConfigError, match=r"^cluster\.address: required"):
        validate(_compose("cluster=dask_address"))
    with pytest.raises(ConfigError, match=r"^cluster\.name: dask_local runs task=train"):
        validate(_compose("cluster=dask_local", "task=record"))
    with pytest.raises(ConfigError, match=r"^backend\.name: cluster=dask_cuda runs the CuPy"):
        validate(_compose("cluster=dask_cuda"))
    with pytest.raises(ConfigError, match=r"^cluster\.workers: must be positive"):
        validate(_compose("cluster=dask_local", "cluster.workers=0"))


def _housekeeping() -> dict[str, object]:
    return {key: dask.config.get(key) for key in cluster.QUIET}


def test_dask_local_workers_run_without_dask_housekeeping() -> None:
    """The worker processes a run starts get ``cluster.QUIET`` (no statistical profiler,
    slower ticks and monitors) and the driver a 5 s connect timeout; the driver's own Dask
    configuration is restored afterwards."""
    before = _housekeeping()
    assert before != cluster.QUIET  # Dask's defaults
    connect = "distributed.comm.timeouts.connect"
    default_connect = dask.config.get(connect)
    assert default_connect != cluster.LOCAL_CONNECT[connect]
    with cluster.cluster_client(validate(_compose("cluster=dask_local",
                                                  "cluster.workers=1")).cluster) as client:
        assert list(client.run(_housekeeping).values()) == [cluster.QUIET]
        # a lost local worker is given up after 5 s of connecting, not Dask's 30 s
        assert dask.config.get(connect) == cluster.LOCAL_CONNECT[connect]
    assert _housekeeping() == before and dask.config.get(connect) == default_connect


SLURM = ("cluster=dask_slurm", "cluster.workers=3", "cluster.slurm.queue=compute",
         "cluster.slurm.account=proj1", "cluster.slurm.cores=4", "cluster.slurm.memory=8GiB",
         "cluster.slurm.walltime=2-00:00:00",
         'cluster.slurm.job_extra_directives=["--gres=gpu:1","--qos=long"]')


def test_dask_slurm_job_script_carries_the_options() -> None:
    """No SLURM here (so the run itself is untested): the script each job would run, built
    without submitting, asks for the configured resources and starts one worker of this
    interpreter with ``cores`` threads and the job's memory."""
    c = validate(_compose(*SLURM))
    with cluster.slurm_cluster(c.cluster) as jobs:
        script = jobs.job_script().splitlines()
    assert [line for line in script if line.startswith("#SBATCH")] == [
        "#SBATCH -J dask-worker", "#SBATCH -p compute", "#SBATCH -A proj1", "#SBATCH -n 1",
        "#SBATCH --cpus-per-task=4", "#SBATCH --mem=8G", "#SBATCH -t 2-00:00:00",
        "#SBATCH --gres=gpu:1", "#SBATCH --qos=long"]
    worker = script[-1].split()
    assert worker[:3] == [sys.executable, "-m", "distributed.cli.dask_worker"]
    assert worker[worker.index("--nthreads") + 1] == "4"
    assert worker[worker.index("--memory-limit") + 1] == "8.00GiB"


def test_dask_slurm_keeps_ctrl_c_a_keyboard_interrupt(tmp_path: Path) -> None:
    """dask-jobqueue's import replaces SIGINT's handler by ``sys.exit``; building the SLURM
    cluster undoes that, so Ctrl-C still saves the step and exits 130 (a fresh interpreter:
    the import happens there for the first time, after Python's own SIGINT handler is set:
    a child of a process that ignores SIGINT would start ignoring it)."""
    script = (
        "import signal, sys\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "from hydra import compose, initialize_config_module\n"
        "from framework.experiment import cluster\n"
        "from framework.experiment.config import validate\n"
        "with initialize_config_module(config_module='conf', version_base='1.3'):\n"
        f"    cfg = compose(config_name='config', overrides={[*SLURM, 'tracking=disabled']!r})\n"
        "cluster.slurm_cluster(validate(cfg).cluster).close()\n"
        "assert 'dask_jobqueue' in sys.modules\n"
        "assert signal.getsignal(signal.SIGINT) is signal.default_int_handler\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_dask_slurm_config_checks() -> None:
    with pytest.raises(ConfigError, match=r"^cluster\.name: dask_slurm needs its job options"):
        validate(_compose("cluster.name=dask_slurm"))
    with pytest.raises(ConfigError, match=r"^cluster\.slurm\.cores: must be positive; got 0"):
        validate(_compose(*SLURM, "cluster.slurm.cores=0"))
    with pytest.raises(ConfigError, match=r"^cluster\.slurm\.memory: '4 apples' is not an"):
        validate(_compose(*SLURM, "cluster.slurm.memory=4 apples"))
    with pytest.raises(ConfigError, match=r"^cluster\.slurm\.walltime: '90 min' is not a SLURM"):
        validate(_compose(*SLURM, "cluster.slurm.walltime=90 min"))


def test_dask_slurm_without_sbatch_is_a_config_error() -> None:
    if shutil.which("sbatch"):
        pytest.skip("sbatch is on PATH: this machine could submit jobs")
    c = validate(_compose(*SLURM))
    with pytest.raises(ConfigError, match=r"^cluster\.name: dask_slurm submits its workers "
                                          "with sbatch, which is not on PATH"):
        with cluster.cluster_client(c.cluster):
            pass


def test_dask_cuda_missing_is_a_config_error() -> None:
    """dask_cuda's run itself needs GPUs (untested here); without the package the
    pre-flight says so in one line."""
    try:
        import dask_cuda  # noqa: F401
    except ImportError:
        c = validate(_compose("cluster=dask_cuda", "backend=cupy"))
        with pytest.raises(ConfigError, match=r"^cluster\.name: dask_cuda is not installed"):
            with cluster.cluster_client(c.cluster):
                pass
    else:
        pytest.skip("dask_cuda is installed; its cluster needs NVIDIA GPUs")


@pytest.mark.gpu
def test_dask_cuda_one_gpu_worker_equals_in_process_cupy(tmp_path: Path, cupy_backend) -> None:
    """cluster=dask_cuda with one GPU worker against the in-process CuPy engine: the same
    batch on the same device, so θ, losses and counts identical (skips with the reason
    without CuPy, a GPU or dask_cuda; step times: ``benchmarks/gpu_check.sh``)."""
    pytest.importorskip("dask_cuda", reason="dask_cuda is not installed (GPU nodes only)")
    args = (*MNIST, "recycle=none", "backend=cupy")
    local = _run(tmp_path, "local", *args)
    dask = _run(tmp_path, "dask", *args, "cluster=dask_cuda", "cluster.workers=1")
    _assert_same_path(local, dask, atol=0.0)


def test_compare_shows_the_mean_imbalance() -> None:
    history = {names.WORKER_IMBALANCE: ((0, 1.5), (1, 1.1)), names.UPPER_LOSS: ((0, 1), (1, 1))}
    dask = RunRecord("a", "dask", "FINISHED", 0.0, 1.0, {}, {}, {}, history)
    local = RunRecord("b", "local", "FINISHED", 0.0, 1.0, {}, {}, {}, {})
    rows = compare.rows_from_records([dask, local])
    assert rows[0].imbalance == pytest.approx(1.3) and np.isnan(rows[1].imbalance)
    table = compare.format_table(rows).splitlines()
    assert table[0].rstrip(" |").endswith("imbalance")
    assert table[2].rstrip(" |").endswith("1.30") and table[3].rstrip(" |").endswith("-")
