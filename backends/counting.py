"""Counting operator applications where they happen: a *pass* is one sequential call (a
block of b vectors is one pass), an *application* counts each vector (b per block)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import astuple, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class Counts:
    """A snapshot of operation counts; subtract two snapshots for the work in between."""

    hvp: int = 0
    hvp_passes: int = 0
    jac_t: int = 0
    jac_t_passes: int = 0
    f_evals: int = 0
    grad_evals: int = 0

    def __sub__(self, other: Counts) -> Counts:
        return Counts(*(a - b for a, b in zip(astuple(self), astuple(other), strict=True)))

    @property
    def applications(self) -> int:
        """Operator applications: HVPs plus Jᵀ products (a block of b counts b)."""
        return self.hvp + self.jac_t

    @property
    def passes(self) -> int:
        """Sequential operator calls (a block counts one)."""
        return self.hvp_passes + self.jac_t_passes


class Counter:
    """Mutable tally owned by a problem or an operator; ``snapshot()`` freezes it."""

    def __init__(self) -> None:
        self.reset()

    def add(self, kind: str, vectors: int = 1) -> None:
        """Record one pass of ``kind`` ('hvp', 'jac_t', 'f', 'grad') over ``vectors`` vectors."""
        if kind in ("hvp", "jac_t"):
            self._counts[kind] += vectors
            self._counts[kind + "_passes"] += 1
        elif kind in ("f", "grad"):
            self._counts[kind + "_evals"] += vectors
        else:
            raise ValueError(f"unknown count kind {kind!r}; use 'hvp', 'jac_t', 'f' or 'grad'")

    def snapshot(self) -> Counts:
        return Counts(**self._counts)

    def reset(self) -> None:
        self._counts = dict.fromkeys((f.name for f in fields(Counts)), 0)


class CountingOperator:
    """Wrap ``apply(v)`` (v of shape (n,) or (n, b)) so every application is counted, as
    ``kind`` in ``counter`` (a problem's shared one, or a fresh one)."""

    def __init__(self, apply: Callable[[Any], Any], n: int, *, counter: Counter | None = None,
                 kind: str = "hvp") -> None:
        self._apply = apply
        self.shape = (n, n)
        self.counter = counter if counter is not None else Counter()
        self.kind = kind

    def __call__(self, v: Any) -> Any:
        if v.shape[0] != self.shape[1]:
            raise ValueError(f"operator of shape {self.shape} applied to array of shape {v.shape}")
        self.counter.add(self.kind, 1 if v.ndim == 1 else int(v.shape[1]))
        return self._apply(v)

    @property
    def applications(self) -> int:
        return getattr(self.counter.snapshot(), self.kind)

    @property
    def passes(self) -> int:
        return getattr(self.counter.snapshot(), self.kind + "_passes")
