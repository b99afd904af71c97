"""A run's MLflow tracker: writes go to a writer process, in call order, without waiting.

Importing mlflow, opening the store and every write happen in one writer process per
interpreter (``python -m framework.experiment.tracking``), on another core.  A call pickles
its write (later changes to its arrays do not matter) and returns; ``run_id``, ``flush`` and
``end`` wait for the writer.  An http(s) server that does not answer at the start is
reported at once; a store unavailable later stops nothing (the writer buffers; its warnings
reach the ``hyperkrylov`` logger); any other failure stops the run's writes and is raised as
one ``TrackingError`` line by its next call.  The writer runs in its own session (Ctrl-C
reaches only this process: the run ends KILLED); when this process dies, the writer writes
what is in its pipe and exits.  A call writes its message into the pipe itself when nothing
is queued before it and the pipe has room (the writer keeps up; Linux), so such a write, a
checkpoint's included, survives a kill of this process once the call returned; otherwise a
thread queues it, and a writer held up (a store down) never holds up the run.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import queue
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from framework.experiment import checkpoint
from framework.experiment.console import LOG
from framework.experiment.tracking import (
    TrackingError,
    check_reachable,
    check_writable,
    resolve_uri,
)


class _WriterProcess:
    """The writer process of this interpreter and the threads that feed and read its pipes."""

    def __init__(self) -> None:
        path = [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH")]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, path))}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "framework.experiment.tracking"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, start_new_session=True)
        self.pipe = _Pipe(self.process.stdin.fileno())
        self.pid = os.getpid()  # a forked interpreter must start its own writer
        self.trackers: dict[int, Tracker] = {}
        self.gone: str | None = None
        self.outbox: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self.queued = 0  # messages in ``outbox`` or being written by ``_feed``
        self.counting = threading.Lock()  # guards ``queued``
        self.writing = threading.Lock()  # held by whoever writes to the pipe
        threading.Thread(target=self._feed, name="mlflow-feed", daemon=True).start()
        threading.Thread(target=self._read, name="mlflow-read", daemon=True).start()

    def send(self, message: bytes) -> None:
        """Write ``message`` into the pipe now when nothing is queued and the pipe takes it
        without blocking; else queue it for ``_feed``."""
        with self.counting:
            direct = self.queued == 0 and self.writing.acquire(blocking=False)
            if not direct:
                self.queued += 1
                self.outbox.put(message)
                return
        try:
            if self.pipe.takes(len(message)):
                with contextlib.suppress(OSError, ValueError):  # gone: ``_read`` says it
                    self.process.stdin.write(message)
                    self.process.stdin.flush()
                return
            with self.counting:  # first in line: ``_feed`` writes it once this returns
                self.queued += 1
                self.outbox.put(message)
        finally:
            self.writing.release()

    def _feed(self) -> None:
        """Write queued requests to the pipe (a full pipe blocks this thread only)."""
        with contextlib.suppress(OSError, ValueError):  # the writer is gone: ``_read`` says it
            while True:
                message = self.outbox.get()
                with self.writing:
                    self.process.stdin.write(message)
                    self.process.stdin.flush()
                with self.counting:
                    self.queued -= 1

    def _read(self) -> None:
        """Hand each reply and failure to its tracker; on the writer's end, fail them all."""
        with contextlib.suppress(EOFError, OSError, pickle.UnpicklingError):
            while True:
                key, kind, payload = pickle.load(self.process.stdout)
                tracker = self.trackers.get(key)
                if kind == "notice":
                    LOG.log(*payload)
                elif tracker is not None and kind == "failed":
                    tracker.failure = tracker.failure or payload
                elif tracker is not None:
                    tracker.replies.put(payload)
        self.gone = f"the MLflow writer process exited (code {self.process.wait()})"
        for tracker in list(self.trackers.values()):
            tracker.failure = tracker.failure or self.gone
            tracker.replies.put(None)  # wakes a waiting call, which raises the failure


class _Pipe:
    """The write end ``fd`` of the pipe to the writer, widened to ``size`` bytes where Linux
    allows (64 KiB by default; unprivileged up to /proc/sys/fs/pipe-max-size, 1 MiB by
    default), and how much it takes without blocking (Linux; elsewhere nothing is known)."""

    PAGE = 4096  # the unread bytes may leave up to a page unused at either end

    def __init__(self, fd: int, size: int = 1 << 20) -> None:
        self.fd, self.capacity = fd, 0
        with contextlib.suppress(ImportError, AttributeError, OSError):  # not Linux
            import fcntl

            with contextlib.suppress(OSError):  # a lower limit: the default size stays
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
            self.capacity = fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)

    def takes(self, nbytes: int) -> bool:
        """Whether writing ``nbytes`` now cannot block (the reader only frees space)."""
        if not self.capacity:
            return False
        try:
            import fcntl
            import termios

            unread = struct.unpack("i", fcntl.ioctl(self.fd, termios.FIONREAD, b"\0" * 4))[0]
        except OSError:
            return False
        return nbytes <= self.capacity - unread - 2 * self.PAGE


_shared: _WriterProcess | None = None
_shared_lock = threading.Lock()


def _writer_process() -> _WriterProcess:
    """This interpreter's writer process, started on first use (again if it died)."""
    global _shared
    with _shared_lock:
        if _shared is None or _shared.gone is not None or _shared.pid != os.getpid():
            _shared = _WriterProcess()
        return _shared


class Tracker:
    """One MLflow run (see the module docstring)."""

    enabled = True

    def __init__(self, uri: str | None = None, experiment: str = "hyperkrylov") -> None:
        self.uri = resolve_uri(uri)
        self.experiment = experiment
        check_reachable(self.uri)
        check_writable(self.uri)
        self.failure: str | None = None
        self.replies: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._started = self._ended = False
        self._run_id: str | None = None
        self._writer = _writer_process()
        self._key = id(self)  # unique while registered (until ``end``)
        self._writer.trackers[self._key] = self
        self._send("open", self.uri, experiment)

    def _raise_failure(self) -> None:
        self.failure = self.failure or self._writer.gone
        if self.failure is not None:
            raise TrackingError(self.failure)

    def _send(self, op: str, *args: Any, reply: bool = False) -> Any:
        """Send ``op`` to the writer; ``reply``: wait for its answer."""
        self._raise_failure()
        if self._ended:
            raise TrackingError(f"the MLflow run at {self.uri} has ended")
        message = (self._key, op, args, reply)  # pickled now: later changes do not matter
        self._writer.send(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))
        if not reply:
            return None
        value = self.replies.get()
        self._raise_failure()
        return value

    def _write(self, op: str, *args: Any) -> None:
        """Send ``op`` (a ``tracking._Writer`` method) for the started run."""
        if not self._started:
            raise TrackingError("no active run: call Tracker.start() first")
        self._send(op, *args)

    def start(self, *, run_name: str | None = None, tags: Mapping[str, str] | None = None,
              run_id: str | None = None, record_to: str | Path | None = None,
              sweep: tuple[str, str] | None = None) -> None:
        """Create a run, or resume the run ``run_id`` (status back to RUNNING; metrics at
        steps the store holds are not logged again).  ``record_to``: a file that receives the
        new run's id once it exists; without ``run_id``, the unfinished run that a run killed
        in that folder left (recorded there, or tagged with the folder) is resumed.
        ``sweep``: (folder, name) of a multirun sweep, whose parent run (created by its first
        job) a new run is nested in."""
        tags = {k: str(v) for k, v in (tags or {}).items()}
        self._send("start", run_name, tags, run_id, sys.argv[0],
                   None if record_to is None else str(record_to), sweep)
        self._started = True

    @property
    def run_id(self) -> str | None:
        """The run's id, once it exists (None before ``start``)."""
        if self._started and self._run_id is None:
            self._run_id = self.flush()
        return self._run_id

    def flush(self) -> str | None:
        """Wait until every write so far is in the store (or the output folder's buffer);
        the run's id."""
        return self._send("flush", reply=True)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params; on a resumed run, those logged are skipped and a changed one is the tag
        ``resume.<key>`` (MLflow forbids changing a param)."""
        self._write("write", "log_params", {key: str(value) for key, value in params.items()})

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log numeric metrics at ``step`` (non-numeric values are skipped)."""
        self._write("write", "log_batch", _numbers(metrics, step), [], [])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._write("write", "log_batch", [], [], [(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._write("write", "log_artifact", str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._write("write", "log_text", text, artifact_file)

    def log_input(self, path: str | Path, name: str, context: str) -> None:
        """Log the file ``path`` as the run's input dataset ``name`` (``mlflow.log_input``)."""
        self._write("log_input", str(path), name, context)

    def fetch(self, run_id: str, artifact: str, folder: str | Path) -> str | None:
        """Download ``artifact`` of the run ``run_id`` of this experiment into ``folder``
        (before ``start``); None, or why it cannot (one line)."""
        return self._send("fetch", run_id, artifact, str(folder), reply=True)

    def save_checkpoint(self, path: str | Path, state: dict[str, Any],
                        metrics: Sequence[tuple[Mapping[str, float], int]] = ()) -> None:
        """``checkpoint.save`` of ``state`` plus ``"run_id"`` and its artifact, by the writer
        once every write before it and ``metrics`` ((metrics, step) pairs) are in the store:
        one message, so a kill keeps both or neither.  Returns without waiting for them;
        a kill of this process after it returned keeps the checkpoint when its message went
        straight into the pipe (the module docstring)."""
        numbers = [n for m, step in metrics for n in _numbers(m, step)]
        self._write("checkpoint", str(path), state, numbers)

    def end(self, status: str = "FINISHED") -> None:
        """Mark the run FINISHED (or FAILED / KILLED) once every write is done; only a run
        ending FINISHED raises a failure (a failed run reports its own error)."""
        if self._ended:
            return
        try:
            if self._started:
                self._send("end", status)
            run_id = self._send("close", reply=True)
            self._run_id = self._run_id or run_id
        except TrackingError:
            if status == "FINISHED":
                raise
        finally:
            self._ended = True
            self._writer.trackers.pop(self._key, None)


def _numbers(metrics: Mapping[str, float], step: int) -> list[tuple[str, float, int, int]]:
    """(key, value, timestamp, step) of the numeric ``metrics``."""
    stamp, numbers = int(time.time() * 1000), []
    for key, value in metrics.items():
        with contextlib.suppress(TypeError, ValueError):
            numbers.append((key, float(value), stamp, int(step)))
    return numbers


class NullTracker:
    """A tracker that records nothing (``tracking.enabled=false``, tests, benchmarks)."""

    enabled = False
    uri: str | None = None
    run_id = None

    def _ignore(self, *args: Any, **kwargs: Any) -> None:
        return None

    start = log_params = log_metrics = set_tags = log_artifact = log_text = _ignore
    log_input = flush = end = _ignore

    def save_checkpoint(self, path: str | Path, state: dict[str, Any],
                        metrics: Sequence[tuple[Mapping[str, float], int]] = ()) -> None:
        checkpoint.save(path, {**state, "run_id": None})

    def describe(self) -> str:
        return "tracking disabled"


def make_tracker(cfg: Any) -> Tracker | NullTracker:
    """A ``Tracker`` for a ``TrackingConfig`` (``NullTracker`` when ``enabled`` is false)."""
    return Tracker(cfg.uri, cfg.experiment) if cfg.enabled else NullTracker()
