"""What a run tells its user: messages on the ``hyperkrylov`` logger, and tables.

Under the ``hyperkrylov`` command Hydra's job logging (``conf/config.yaml``) shows them on
stdout as ``hyperkrylov: <message>`` and writes them, timestamped, to the run's
``hyperkrylov.log``; a multirun job's lines start with ``[job N]``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

LOG = logging.getLogger("hyperkrylov")


class _JobLabel(logging.Filter):
    def __init__(self, num: int) -> None:
        super().__init__()
        self.prefix = f"[job {num}] "

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            record.msg = f"{self.prefix}{record.msg}"
        return True


def say(message: str) -> None:
    """Log ``message`` at INFO on the ``hyperkrylov`` logger."""
    LOG.info(message)


def label_job(num: int | None) -> None:
    """Start this process's messages with ``[job num]`` (a multirun's job), or not (None)."""
    for old in [f for f in LOG.filters if isinstance(f, _JobLabel)]:
        LOG.removeFilter(old)
    if num is not None:
        LOG.addFilter(_JobLabel(num))


def fmt(value: float, spec: str) -> str:
    """``value`` formatted by ``spec``; "-" when it is NaN or infinite (not logged)."""
    return "-" if not math.isfinite(value) else format(value, spec)


def markdown_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """A Markdown table with padded columns."""
    widths = [max(len(c) for c in col) for col in zip(header, *body, strict=True)]
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(b) for b in body)])
