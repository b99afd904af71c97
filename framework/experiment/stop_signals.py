"""SIGINT and SIGTERM held until a training step ends, so a stopped run saves the state of
a step boundary: θ, the optimiser, the engine's warm starts and recycle spaces, the batch
generator and the logged history all of one step, and the rerun resumes bit-identically."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StepBoundary:
    """``with boundary.step():`` holds the stop signals: the first is delivered to its own
    handler (Ctrl-C's ``KeyboardInterrupt``, the app's ``Terminated``) when the block ends;
    a second one during the same step is delivered at once and sets ``forced`` (the step's
    state is then partial: do not save it).  Outside the main thread nothing is held."""

    def __init__(self) -> None:
        self.forced = False

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        held: list[int] = []
        previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}

        def restore() -> None:
            for s, handler in previous.items():
                signal.signal(s, handler)

        def hold(signum: int, frame: object) -> None:
            held.append(signum)
            if len(held) > 1:  # asked twice: stop now
                self.forced = True
                restore()
                signal.raise_signal(signum)

        for s in STOP_SIGNALS:
            signal.signal(s, hold)
        try:
            yield
        finally:
            restore()
        if held and not self.forced:
            signal.raise_signal(held[0])  # its handler runs here, after the step
