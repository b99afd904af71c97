"""What a run tells its user: messages on the ``hyperkrylov`` logger (shown and written to
``hyperkrylov.log`` by Hydra's job logging, ``conf/config.yaml``), and tables."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

LOG = logging.getLogger("hyperkrylov")
say = LOG.info  # a message for the user


class _JobLabel(logging.Filter):
    prefix = ""  # "[job N] " in a multirun's job

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            record.msg = f"{self.prefix}{record.msg}"
        return True


_JOB_LABEL = _JobLabel()
LOG.addFilter(_JOB_LABEL)


def label_job(num: int | None) -> None:
    """Start this process's messages with ``[job num]`` (a multirun's job), or not (None)."""
    _JOB_LABEL.prefix = "" if num is None else f"[job {num}] "


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
