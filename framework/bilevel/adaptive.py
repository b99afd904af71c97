"""Adaptive recycling: use recycle vectors only while they pay in measured seconds.

Recycling k vectors costs k operator applications (C = HU) and k-vector projections per
iteration, often more than it saves on warm-started systems.  ``RecyclePolicy`` decides
before each step between no recycling and k' ≤ k vectors, from what the engine measured:

* k' = min(k, ⌊BUDGET · m⌋), m the recent iterations per system without recycling (a
  losing try costs at most a quarter of a plain solve); none (no harvest, no try) when
  k' < MIN_DIM.
* The Hessian-phase seconds per system of each choice decide (an exponential average for
  the choice in use, the latest try for the other; the cold first step is not measured;
  recycling must be 5 % faster).  The other choice is tried after ``interval`` steps; a
  losing try doubles it (quadruples it when it took over 1.5× as long) up to MAX_INTERVAL.
* The plain step before a try harvests the k' vectors the try uses (otherwise nothing is
  harvested while recycling does not pay; a try without a carry is a plain step).

With a shadow baseline the plain seconds are measured on every step instead of by tries.
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_DIM = 4  # fewer recycle vectors cannot save more than they cost (m < 16 iterations)
MAX_INTERVAL = 64  # steps: how long a change of costs can go unnoticed
FIRST_INTERVAL = 8  # steps before the other choice is tried after a switch
BUDGET = 0.25
SMOOTHING = 0.5  # weight of the newest figure in the exponential averages


@dataclass(frozen=True)
class Plan:
    """What the next step does: ``dim`` recycle vectors used (0: none), ``harvest`` vectors
    harvested for the step after (0: no harvest)."""

    dim: int
    harvest: int


class RecyclePolicy:
    """Chooses per step between no recycling and k' ≤ ``max_dim`` recycle vectors."""

    def __init__(self, max_dim: int) -> None:
        if max_dim < 1:
            raise ValueError(f"adaptive recycling needs recycle dim >= 1; got {max_dim}")
        self.max_dim = max_dim
        self.seconds: dict[bool, float] = {}  # recycling? → Hessian seconds per system
        self.plain_iterations: float | None = None
        self.recycling = False  # the choice in use
        self.interval, self.wait = FIRST_INTERVAL, 1  # steps until the other choice is tried
        self.warming_up = True  # the first step (cold, not warm-started) is not measured
        self.shadowed = False  # plain seconds measured on every step (a shadow baseline)

    def affordable(self) -> int:
        """k' = min(k, ⌊BUDGET · plain iterations per system⌋)."""
        if self.plain_iterations is None:
            return 0
        return min(self.max_dim, int(BUDGET * self.plain_iterations))

    def plan(self) -> Plan:
        """The next step's dimension and harvest (see the module docstring)."""
        k = self.affordable()
        if k < min(MIN_DIM, self.max_dim):
            return Plan(0, 0)
        if self.recycling:  # a try without recycling keeps harvesting for the step after
            try_plain = self.wait == 0 and not self.shadowed
            return Plan(0, k) if try_plain else Plan(k, k)
        if self.wait == 0:
            return Plan(k, k)
        return Plan(0, k if self.wait == 1 else 0)  # harvest for the try that comes next

    def record(self, dim: int, seconds: float, iterations: float, *,
               plain_seconds: float | None = None, plain_iterations: float | None = None) -> None:
        """What a step measured per system: the dimension it used (0 when it had no recycle
        space), its Hessian-phase seconds and Krylov iterations; with a shadow baseline, the
        plain solve's seconds and iterations on the same systems."""
        if self.warming_up:
            self.warming_up = False
            return
        used = dim > 0
        if used != self.recycling:  # a try: the choice's last figure is stale, replace it
            self.seconds.pop(used, None)
        self.seconds[used] = _smooth(self.seconds.get(used), seconds)
        if not used:
            self.plain_iterations = _smooth(self.plain_iterations, iterations)
        if plain_seconds is not None and plain_iterations is not None:
            self.shadowed = True
            self.seconds[False] = _smooth(self.seconds.get(False), plain_seconds)
            self.plain_iterations = _smooth(self.plain_iterations, plain_iterations)
        if len(self.seconds) < 2:
            self.wait = max(self.wait - 1, 0)
            return
        # recycling must win by 5 % to be chosen (one noisy try should not switch to it)
        best = self.seconds[True] < (0.95 if not self.recycling else 1.0) * self.seconds[False]
        if best != self.recycling:  # the other choice now wins: switch
            self.recycling, self.interval = best, FIRST_INTERVAL
            self.wait = self.interval
        elif used != self.recycling:  # a try lost: wait 2× longer (4× when it lost by half)
            lost_by = self.seconds[used] / self.seconds[self.recycling]
            self.interval = min(self.interval * (4 if lost_by > 1.5 else 2), MAX_INTERVAL)
            self.wait = self.interval
        else:
            self.wait = max(self.wait - 1, 0)


def _smooth(old: float | None, value: float) -> float:
    return value if old is None else SMOOTHING * value + (1 - SMOOTHING) * old
