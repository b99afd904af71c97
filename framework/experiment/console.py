"""What a run tells its user on the console: prefixed, flushed lines and tables."""

from __future__ import annotations

import math
from collections.abc import Sequence


def say(message: str) -> None:
    """Print ``hyperkrylov: <message>`` and flush (visible at once in logs and pipes)."""
    print(f"hyperkrylov: {message}", flush=True)


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
