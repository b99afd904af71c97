"""Kill points for ``tests/test_kills.py``: with this folder on ``PYTHONPATH`` and
``HYPERKRYLOV_TEST_KILL_AT`` set, Python imports this module at start-up in the CLI and in
its MLflow writer process (which inherits the environment), and it arranges for the process
to be killed at one moment of the run.  The library is not changed: its calls are wrapped.

Moments (``N`` counts calls in this process):

- ``create-run``: the writer, as it is about to create the MLflow run — the whole job dies
  (SIGKILL to the CLI, then to the writer: a node failure, a cgroup OOM kill);
- ``run-created``: the writer, once ``MlflowClient.create_run`` returned — the job dies;
- ``checkpoint-write:N``: the writer, half-way through writing the archive of its N-th
  checkpoint to the temporary file — the job dies;
- ``artifact:NAME``: the writer, half-way through copying the artifact file ``NAME`` into the
  store — the job dies;
- ``step:N``: the CLI, in the middle of its N-th training step (after the engine's evaluation,
  before the optimiser step) — SIGKILL to the CLI only (``kill -9 <pid>``);
- ``checkpoint-sent:N``: the CLI, the moment its N-th ``Tracker.save_checkpoint`` returns —
  SIGKILL to the CLI only;
- ``sigterm:N``: the CLI, in the middle of its N-th step, receives SIGTERM (a scheduler's
  preemption) and carries on as the library decides.
"""

from __future__ import annotations

import functools
import io
import os
import shutil
import signal

_MOMENT = os.environ.get("HYPERKRYLOV_TEST_KILL_AT", "")
_CLI_PID = "HYPERKRYLOV_TEST_KILL_CLI_PID"  # set by the CLI; its writer inherits it


def _kill_job() -> None:
    """SIGKILL the CLI, then this writer process."""
    os.kill(int(os.environ[_CLI_PID]), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def _on_call(owner: object, name: str, action, before: bool = False, nth: int = 1) -> None:
    """Wrap ``owner.name``: at its ``nth`` call run ``action`` (before or after the call)."""
    original = getattr(owner, name)
    calls = [0]

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        calls[0] += 1
        hit = calls[0] == nth
        if hit and before:
            action()
        result = original(*args, **kwargs)
        if hit and not before:
            action()
        return result

    setattr(owner, name, wrapper)


def _half_savez(nth: int) -> None:
    """``numpy.savez``: the ``nth`` archive is written half, then the job dies."""
    import numpy as np

    original, calls = np.savez, [0]

    def savez(file, *args, **kwds):
        calls[0] += 1
        if calls[0] != nth:
            return original(file, *args, **kwds)
        buffer = io.BytesIO()
        original(buffer, *args, **kwds)
        data = buffer.getvalue()
        file.write(data[: len(data) // 2])
        file.flush()
        os.fsync(file.fileno())
        _kill_job()

    np.savez = savez


def _half_copy(name: str) -> None:
    """``shutil.copyfileobj``: the file ``name`` is copied half, then the job dies."""
    original = shutil.copyfileobj

    def copyfileobj(source, target, length=0):
        if os.path.basename(getattr(source, "name", "")) != name:
            return original(source, target, length)
        size = os.fstat(source.fileno()).st_size
        target.write(source.read(size // 2))
        target.flush()
        _kill_job()

    shutil.copyfileobj = copyfileobj


def _install(moment: str) -> None:
    kind, _, arg = moment.partition(":")
    writer = _CLI_PID in os.environ
    if not writer:
        os.environ[_CLI_PID] = str(os.getpid())
    if writer and kind in ("create-run", "run-created"):
        from mlflow.tracking import MlflowClient

        _on_call(MlflowClient, "create_run", _kill_job, before=kind == "create-run")
    elif writer and kind == "checkpoint-write":
        _half_savez(int(arg))
    elif writer and kind == "artifact":
        _half_copy(arg)
    elif not writer and kind == "checkpoint-sent":
        from framework.experiment.tracker import Tracker

        _on_call(Tracker, "save_checkpoint", lambda: os.kill(os.getpid(), signal.SIGKILL),
                 nth=int(arg))
    elif not writer and kind in ("step", "sigterm"):
        from framework.bilevel.engine import BilevelEngine

        sig = signal.SIGKILL if kind == "step" else signal.SIGTERM
        _on_call(BilevelEngine, "evaluate", lambda: os.kill(os.getpid(), sig), nth=int(arg))
    elif kind not in ("create-run", "run-created", "checkpoint-write", "artifact", "step",
                      "sigterm", "checkpoint-sent"):
        raise ValueError(f"HYPERKRYLOV_TEST_KILL_AT={moment!r}: unknown moment")


if _MOMENT:
    _install(_MOMENT)
