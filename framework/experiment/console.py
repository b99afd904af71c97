"""What a run tells its user on the console (one prefixed, flushed line per message)."""

from __future__ import annotations


def say(message: str) -> None:
    """Print ``hyperkrylov: <message>`` and flush (visible at once in logs and pipes)."""
    print(f"hyperkrylov: {message}", flush=True)
