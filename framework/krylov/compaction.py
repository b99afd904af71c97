"""Dropping finished rows from a batched solve (README, "Compaction").

A batched MINRES pass applies the operator to every row, frozen or not, so a batch whose
rows need 0 to 50 iterations pays B × 50 row applications for perhaps B × 8 that count.
When at most half of the rows still iterate, ``rminres`` continues on those rows alone:
the operator and the preconditioner are *restricted* to them, and every per-row array and
scalar is cut to them.  A row's arithmetic does not depend on the other rows, so its
iterates, iteration count and status are those of the uncompacted solve.

An operator (or preconditioner) takes part when it has ``restrict(rows)``: the operator of
rows ``rows`` (host indices into its own rows, ascending), itself restrictable.  Per-sample
matrices (B, n, n) and one shared matrix (n, n) are restrictable; so is any callable
wrapped in ``Restrictable``.  ``Retired`` keeps the rows that left: their final iterate,
status and iteration count, and each segment's residual history, assembled at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from array_api_compat import array_namespace
from array_api_compat import device as device_of

from backends.host import host_list


class Restrictable:
    """A batch operator ``apply`` (rows (B, n[, k]) → (B, n[, k])) that ``restrict(rows)``
    turns into the operator of those rows (``make(rows)``, itself a ``Restrictable``)."""

    def __init__(self, apply: Callable[[Any], Any],
                 make: Callable[[list[int]], Restrictable]) -> None:
        self.apply, self.make = apply, make

    def __call__(self, V: Any) -> Any:
        return self.apply(V)

    def restrict(self, rows: list[int]) -> Restrictable:
        return self.make(rows)


def restrictable(A: Any) -> bool:
    return callable(getattr(A, "restrict", None))


def take(rows: list[int], value: Any) -> Any:
    """Rows ``rows`` of a (B, ...) array (None and Python floats pass through)."""
    if value is None or not hasattr(value, "shape"):
        return value
    xp = array_namespace(value)
    return xp.take(value, xp.asarray(rows, dtype=xp.int64, device=device_of(value)), axis=0)


class Retired:
    """The rows a solve has dropped (original row numbers), with what ``_finish`` needs."""

    def __init__(self, rows: int) -> None:
        self.ids: list[int] = list(range(rows))  # original number of each current row
        self.pieces: list[tuple[list[int], Any]] = []  # (original rows, their final x)
        self.codes: dict[int, int] = {}
        self.iterations: dict[int, int] = {}
        self.segments: list[tuple[list[int], list[Any]]] = []  # (rows, residual history)

    def retire(self, keep: list[int], x: Any, codes: Sequence[int],
               iterations: Sequence[int], history: list[Any]) -> None:
        """Record the current rows not in ``keep`` (their iterate rows of ``x``, statuses,
        counts) and the history so far; the current rows become ``keep``."""
        kept = set(keep)
        gone = [r for r in range(len(self.ids)) if r not in kept]
        self.pieces.append(([self.ids[r] for r in gone], take(gone, x)))
        for r in gone:
            self.codes[self.ids[r]], self.iterations[self.ids[r]] = codes[r], iterations[r]
        self.segments.append((list(self.ids), history))
        self.ids = [self.ids[r] for r in keep]

    def assemble(self, x: Any, codes: Sequence[int], iterations: Sequence[int],
                 history: list[Any], host: Callable[[Any], list[float]]
                 ) -> tuple[Any, list[int], list[int], list[list[float]]]:
        """Every original row's final x (B, n), status code, iterations and residual history
        (a list of host floats from iteration 0 on), the current rows' taken from the
        arguments (``host`` turns a history entry into host floats)."""
        total = len(self.ids) + sum(len(ids) for ids, _ in self.pieces)
        all_codes, all_iterations = dict(self.codes), dict(self.iterations)
        for r, i in enumerate(self.ids):
            all_codes[i], all_iterations[i] = codes[r], iterations[r]
        series: list[list[float]] = [[] for _ in range(total)]
        for ids, entries in [*self.segments, (self.ids, history)]:
            table = [host(h) for h in entries]
            for r, i in enumerate(ids):
                series[i].extend(row[r] for row in table)
        return (self.rows(x), [all_codes[i] for i in range(total)],
                [all_iterations[i] for i in range(total)], series)

    def rows(self, x: Any) -> Any:
        """Every original row (B, n): the retired rows' final x, the current rows' ``x``."""
        order = [i for ids, _ in self.pieces for i in ids] + self.ids
        stacked = array_namespace(x).concat([piece for _, piece in self.pieces] + [x], axis=0)
        where = [0] * len(order)
        for position, i in enumerate(order):
            where[i] = position
        return take(where, stacked)


def host_entries(entry: Any) -> list[float]:
    """A residual-history entry (host list or device (B,) array) as host floats."""
    return [float(v) for v in (entry if isinstance(entry, list) else host_list(entry))]
