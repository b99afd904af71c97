"""Data-parallel hypergradients on Dask (README, "Running on a cluster"): the samples are
sharded over the workers, each holding a ``BilevelEngine`` over its shard with the shard's
per-sample state (a Dask actor, ``ShardEngine``).  Per step the driver (``DaskEngine``)
sends θ and each shard's part of the mini-batch and takes the in-process engine's own
mean over the returned per-sample hypergradients in index order (so, without recycling, a
run is the in-process run to the bit).  A lost worker's shard (its call raises ``OSError``
or its actor's future is no longer finished) is re-created on a live worker from the last
checkpoint's state, or cold, and its part recomputed.
"""

from __future__ import annotations

import importlib
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import astuple, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from threadpoolctl import threadpool_limits

from backends.counting import Counts
from backends.threads import choose_num_threads
from framework.bilevel.records import PhaseTimes, StepResult, mean_gradient
from framework.experiment import names
from framework.experiment.config import ClusterConfig, ClusterName, Config, ConfigError
from framework.experiment.console import say
from framework.experiment.engine_setup import build_samples, make_engine
from problems.factory import ProblemSet

if TYPE_CHECKING:
    from dask_jobqueue import SLURMCluster
    from distributed import Client

# Dask (≈ 1 s to import) is imported by the runs that use it, in the functions below.
CONNECT_SECONDS = 5  # dask_address: how long a scheduler may take to answer
# Dask's housekeeping these runs do not use (the profiler, 20 ms ticks, 100 ms memory and
# 500 ms system monitors), off or slowed in the driver and a local cluster's workers
# (README, "Speed on this 2-core machine").
QUIET = {"distributed.worker.profile.enabled": False, "distributed.admin.tick.interval": "1s",
         "distributed.worker.memory.monitor-interval": "1s",
         "distributed.admin.system-monitor.interval": "5s"}
# On one machine (dask_local, dask_cuda) a worker that does not accept a connection at
# once is dead: give up connecting after 5 s rather than Dask's 30 s, so a lost worker's
# shard is re-created without a half-minute stall (remote clusters keep Dask's default).
LOCAL_CONNECT = {"distributed.comm.timeouts.connect": "5s"}


@contextmanager
def cluster_client(c: ClusterConfig) -> Iterator[Client | None]:
    """A Dask client of the cluster ``c`` (None for ``local``), closed (with a cluster it
    started) on exit.  A missing ``dask_cuda`` or ``sbatch`` or a scheduler that does not
    answer is a ``ConfigError`` before any work."""
    if c.name == ClusterName.local:
        yield None
        return
    import dask
    from distributed import Client

    with ExitStack() as started:  # clients call the actors directly, not via the scheduler
        started.enter_context(dask.config.set(QUIET))
        if c.name == ClusterName.dask_address:
            try:
                client = Client(c.address, timeout=CONNECT_SECONDS, direct_to_workers=True)
            except (OSError, TimeoutError) as exc:
                raise ConfigError(f"cluster.address: no Dask scheduler answers at {c.address} "
                                  f"({type(exc).__name__}); start one (`dask scheduler`) or "
                                  "fix the address") from exc
        else:
            if c.name in (ClusterName.dask_local, ClusterName.dask_cuda):
                started.enter_context(dask.config.set(LOCAL_CONNECT))
            client = Client(started.enter_context(_start(c)), direct_to_workers=True)
        with client:
            client.wait_for_workers(c.workers or 1)
            yield client


def _start(c: ClusterConfig) -> Any:
    """A new cluster of the kind ``c.name`` (not ``dask_address``) with ``c.workers``."""
    if c.name == ClusterName.dask_cuda:
        try:
            cuda = importlib.import_module("dask_cuda")  # optional: GPU nodes only
        except ImportError as exc:
            raise ConfigError("cluster.name: dask_cuda is not installed; pip install "
                              "dask-cuda (on a node with NVIDIA GPUs)") from exc
        return cuda.LocalCUDACluster(n_workers=c.workers, dashboard_address=None)
    if c.name == ClusterName.dask_slurm:
        if shutil.which("sbatch") is None:
            raise ConfigError("cluster.name: dask_slurm submits its workers with sbatch, which "
                              "is not on PATH; run on a SLURM login node")
        jobs = slurm_cluster(c)
        jobs.scale(c.workers)  # submits the jobs
        return jobs
    from distributed import LocalCluster

    return LocalCluster(n_workers=c.workers, threads_per_worker=1, processes=True,
                        dashboard_address=None)  # ShardEngine limits its BLAS threads


def slurm_cluster(c: ClusterConfig) -> SLURMCluster:
    """The scheduler (in this process) of ``cluster=dask_slurm``, whose ``scale(n)``
    submits n jobs of one worker each with the options ``c.slurm`` (the rest, such as the
    network interface, from dask-jobqueue's configuration)."""
    handler = signal.getsignal(signal.SIGINT)
    from dask_jobqueue import SLURMCluster  # its import sets SIGINT to sys.exit: undone

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, handler)  # Ctrl-C stays KeyboardInterrupt (exit 130)
    s = c.slurm
    return SLURMCluster(queue=s.queue, account=s.account, cores=s.cores, processes=1,
                        memory=s.memory, walltime=s.walltime,
                        job_extra_directives=list(s.job_extra_directives))


class ShardEngine:
    """A Dask actor: the engine over samples ``shard`` of the run ``cfg`` (built on the
    worker, on the worker's backend), with their per-sample state ``samples`` (a
    checkpoint's entries) or cold."""

    def __init__(self, cfg: Config, shard: Sequence[int], samples: list[dict] | None) -> None:
        limit = choose_num_threads(cfg.backend.name, cfg.backend.num_threads)
        if limit is not None:
            threadpool_limits(limits=limit)  # for the worker process's life
        backend, problem_set = build_samples(cfg)
        mine = replace(problem_set, problems=tuple(problem_set.problems[i] for i in shard))
        self.backend, self.engine = backend, make_engine(mine, cfg, backend)
        self.local = {i: j for j, i in enumerate(shard)}
        if samples is not None:
            self.engine.load_state_dict({"samples": samples})

    def evaluate(self, theta: np.ndarray, indices: list[int]) -> tuple[StepResult, float]:
        """The engine's result for samples ``indices`` (θ and the gradient as host NumPy)
        and the seconds it took."""
        t0 = time.perf_counter()
        result = self.engine.evaluate(self.backend.asarray(theta), self._local(indices))
        seconds = time.perf_counter() - t0
        return replace(result, grad=None, sample_grads=self.backend.to_numpy(result.sample_grads),
                       indices=indices), seconds

    def loss(self, theta: np.ndarray, indices: list[int]) -> float:
        return self.engine.loss(self.backend.asarray(theta), self._local(indices))

    def lower_solutions(self, theta: np.ndarray, indices: list[int]) -> np.ndarray:
        X = self.engine.lower_solutions(self.backend.asarray(theta), self._local(indices))
        return self.backend.to_numpy(X)

    def state(self) -> list[dict]:
        return self.engine.state_dict()["samples"]

    def load_state(self, samples: list[dict]) -> None:
        self.engine.load_state_dict({"samples": samples})

    def pid(self) -> int:
        return os.getpid()

    def _local(self, indices: list[int]) -> list[int]:
        return [self.local[i] for i in indices]


class DaskEngine:
    """The engine interface ``train`` uses (``evaluate``, ``loss``, ``lower_solutions``,
    ``state_dict``/``load_state_dict``) over ``ShardEngine`` actors on the workers of
    ``client``: sample i belongs to shard i mod (number of workers), one shard per worker."""

    def __init__(self, client: Client, problem_set: ProblemSet, cfg: Config,
                 backend: Any) -> None:
        self.client, self.cfg, self.backend = client, cfg, backend
        self.theta_shape = problem_set.theta0.shape
        workers = sorted(client.scheduler_info()["workers"])
        count = len(problem_set)
        width = min(len(workers), count)
        self.shards = [tuple(range(k, count, width)) for k in range(width)]
        self.saved: list[dict] | None = None  # per-sample state of the last checkpoint
        self.lost, self.cold = 0, 0  # during the current step
        self.futures = [self._submit(k, None, workers[k]) for k in range(width)]
        self.actors = [f.result() for f in self.futures]

    def _submit(self, k: int, samples: list[dict] | None, worker: str | None = None) -> Any:
        return self.client.submit(ShardEngine, self.cfg, self.shards[k], samples, actor=True,
                                  workers=None if worker is None else [worker], pure=False)

    def _replace(self, k: int, exc: Exception) -> None:
        """Re-create shard k on a live worker from the last checkpoint, or cold, when
        ``exc`` says its worker was lost; else re-raise ``exc`` (the engine's own error)."""
        if not (isinstance(exc, OSError) or self.futures[k].status != "finished"):
            raise exc
        shard = self.shards[k]
        samples = None if self.saved is None else [self.saved[i] for i in shard]
        self.futures[k] = self._submit(k, samples)
        self.actors[k] = self.futures[k].result()
        self.lost += 1
        self.cold += len(shard) if samples is None else 0
        say(f"a Dask worker was lost: shard {k} (samples {list(shard)}) re-created "
            + ("cold (no checkpoint yet)" if samples is None else
               "from the last checkpoint's state") + "; its part of the step is recomputed")

    def _call(self, method: str, parts: dict[int, tuple]) -> dict[int, Any]:
        """``method(*args)`` on the actor of each shard k of ``parts`` (k → args), in
        parallel; a shard whose worker was lost (before the call or during it) is
        re-created and its call repeated."""
        calls, out = {}, {}
        for k, args in parts.items():
            try:
                calls[k] = getattr(self.actors[k], method)(*args)
            except Exception as exc:
                self._replace(k, exc)
                calls[k] = getattr(self.actors[k], method)(*args)
        for k, call in calls.items():
            try:
                out[k] = call.result()
            except Exception as exc:
                self._replace(k, exc)
                out[k] = getattr(self.actors[k], method)(*parts[k]).result()
        return out

    def _split(self, theta: Any, indices: Sequence[int]) -> dict[int, tuple]:
        host = self.backend.to_numpy(theta)
        width = len(self.shards)
        return {k: (host, part) for k in range(width)
                if (part := [int(i) for i in indices if i % width == k])}

    def evaluate(self, theta: Any, indices: Sequence[int]) -> StepResult:
        """The mini-batch ``indices`` at θ, each shard's part on its worker, added up (passes
        and host syncs summed over the workers, phase times the slowest worker's); ``extra``:
        each shard's samples, Krylov iterations and seconds, the imbalance, workers lost."""
        self.lost, self.cold = 0, 0
        parts = self._split(theta, indices)
        done = self._call("evaluate", parts)
        by_sample = {i: (rec, g) for res, _ in done.values()
                     for i, rec, g in zip(res.indices, res.samples, res.sample_grads, strict=True)}
        samples = tuple(by_sample[i][0] for i in indices)
        B = len(indices)
        # the in-process engine's reduction over the same rows in the same order: same bits
        grads = self.backend.asarray(np.stack([by_sample[i][1] for i in indices]))
        results = [res for res, _ in done.values()]
        cluster, times = {}, []
        for k in range(len(self.shards)):  # a shard without samples in the batch: zeros
            res, seconds = done.get(k, (None, 0.0))
            records = () if res is None else res.samples
            cluster[f"worker_{k}_time"] = seconds
            cluster[f"worker_{k}_samples"] = float(len(records))
            cluster[f"worker_{k}_krylov_iterations"] = float(
                sum(r.krylov_iterations for r in records))
            times.append(seconds)
        cluster[names.WORKER_IMBALANCE] = max(times) / (sum(times) / len(times))
        cluster[names.WORKERS_LOST] = float(self.lost)
        cluster[names.COLD_STARTED] = float(self.cold)
        return StepResult(
            float(sum(r.upper_loss for r in samples)) / B,
            mean_gradient(grads, self.theta_shape), tuple(indices), samples,
            counts=_total(r.counts for r in results),
            lower_counts=_total(r.lower_counts for r in results),
            times=PhaseTimes(*np.max([astuple(r.times) for r in results], axis=0).tolist()),
            host_syncs=sum(r.host_syncs for r in results), sample_grads=grads, extra=cluster)

    def loss(self, theta: Any, indices: Sequence[int]) -> float:
        """The mean upper loss of ``indices`` at θ (states unchanged)."""
        parts = self._split(theta, indices)
        done = self._call("loss", parts)
        return sum(done[k] * len(parts[k][1]) for k in sorted(done)) / len(indices)

    def lower_solutions(self, theta: Any, indices: Sequence[int]) -> Any:
        """x*(θ) of ``indices`` as rows (B, n), warm-started from the states."""
        parts = self._split(theta, indices)
        done = self._call("lower_solutions", parts)
        rows = {i: X[j] for k, X in done.items() for j, i in enumerate(parts[k][1])}
        return self.backend.asarray(np.stack([rows[int(i)] for i in indices]))

    def state_dict(self) -> dict[str, Any]:
        """Every sample's state, gathered from the workers (the state a lost shard is
        re-created from)."""
        done = self._call("state", {k: () for k in range(len(self.shards))})
        samples = {i: s for k, shard in enumerate(self.shards)
                   for i, s in zip(shard, done[k], strict=True)}
        self.saved = [samples[i] for i in range(len(samples))]
        return {"samples": self.saved}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Scatter a checkpoint's per-sample state to the shards."""
        samples = state["samples"]  # one per sample: the config (num_samples) is the same
        self.saved = list(samples)
        self._call("load_state", {k: ([samples[i] for i in shard],)
                                  for k, shard in enumerate(self.shards)})

    def worker_pids(self) -> list[int]:
        """The process id of each shard's worker."""
        done = self._call("pid", {k: () for k in range(len(self.shards))})
        return [done[k] for k in range(len(self.shards))]


def _total(counts: Iterator[Counts]) -> Counts:
    return Counts(*np.sum([astuple(c) for c in counts], axis=0).tolist())
