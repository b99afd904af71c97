"""Adaptive recycling: use recycle vectors only while they pay in measured seconds.

Recycling k vectors costs k operator applications (C = HU) and k-vector projections per
iteration, often more than it saves on warm-started systems.  ``RecyclePolicy`` decides
before each step between no recycling and k' ≤ k vectors, from what the engine measured:

* k' = min(k, ⌊BUDGET · m⌋), m the recent iterations per system without recycling (a
  losing try costs at most a quarter of a plain solve); none (no harvest, no try) when
  k' < MIN_DIM.
* The Hessian-phase seconds per system of each choice decide (an exponential average for
  the choice in use, the latest try for the other; the cold first step is not measured;
  recycling must be 5 % faster).  Recycling is entered only after a try of it; while it is
  in use, each step may switch back to plain solves.  The other choice is tried after
  ``interval`` steps; a losing try doubles it (quadruples it when it took over 1.5× as
  long) up to MAX_INTERVAL.
* The plain step before a try harvests the k' vectors the try uses (otherwise nothing is
  harvested while recycling does not pay; a try without a carry is a plain step).
* Tries are paid from an exploration budget: a try (with the harvest before it) starts only
  when what all tries cost so far (seconds beyond the choice in use) plus the expected cost
  of this one (the last try's; one step of the choice in use before any) is at most
  ``explore`` (EXPLORE = 4 %) of the Hessian-phase seconds spent so far.  Exploring never
  costs a run more than about that share, whatever its length; the first try comes after
  about 1/EXPLORE steps.

With a shadow baseline the plain seconds are measured on every step instead of by tries.
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_DIM = 4  # fewer recycle vectors cannot save more than they cost (m < 16 iterations)
MAX_INTERVAL = 64  # steps: how long a change of costs can go unnoticed
FIRST_INTERVAL = 8  # steps before the other choice is tried after a switch
BUDGET = 0.25
SMOOTHING = 0.5  # weight of the newest figure in the exponential averages
EXPLORE = 0.04  # the most of the Hessian-phase seconds that tries may cost


@dataclass(frozen=True)
class Plan:
    """What the next step does: ``dim`` recycle vectors used (0: none), ``harvest`` vectors
    harvested for the step after (0: no harvest)."""

    dim: int
    harvest: int


class RecyclePolicy:
    """Chooses per step between no recycling and k' ≤ ``max_dim`` recycle vectors; tries
    may cost at most ``explore`` of the Hessian-phase seconds."""

    def __init__(self, max_dim: int, explore: float = EXPLORE) -> None:
        if max_dim < 1:
            raise ValueError(f"adaptive recycling needs recycle dim >= 1; got {max_dim}")
        self.max_dim, self.explore = max_dim, explore
        self.seconds: dict[bool, float] = {}  # recycling? → Hessian seconds per system
        self.plain_iterations: float | None = None
        self.recycling = False  # the choice in use
        self.interval, self.wait = FIRST_INTERVAL, 1  # steps until the other choice is tried
        self.warming_up = True  # the first step (cold, not warm-started) is not measured
        self.shadowed = False  # plain seconds measured on every step (a shadow baseline)
        self.spent = 0.0  # Hessian seconds per system of the measured steps, summed
        self.explored = 0.0  # what tries and their harvests cost beyond the choice in use
        self.try_cost: float | None = None  # the last try's (None: none yet)
        self.exploring = False  # the budget granted the coming try (and its harvest)
        self.granted_at = 0.0  # ``explored`` when the coming try was granted

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
            try_plain = self.wait == 0 and self.exploring and not self.shadowed
            return Plan(0, k) if try_plain else Plan(k, k)
        if self.wait == 0 and self.exploring:
            return Plan(k, k)
        # harvest for the try that comes next
        return Plan(0, k if self.wait == 1 and self.exploring else 0)

    def record(self, dim: int, seconds: float, iterations: float, *,
               plain_seconds: float | None = None, plain_iterations: float | None = None) -> None:
        """What a step measured per system: the dimension it used (0 when it had no recycle
        space), its Hessian-phase seconds and Krylov iterations; with a shadow baseline, the
        plain solve's seconds and iterations on the same systems."""
        if self.warming_up:
            self.warming_up = False
            return
        used = dim > 0
        self.spent += seconds
        if self.exploring and self.recycling in self.seconds:  # beyond the choice in use
            self.explored += max(seconds - self.seconds[self.recycling], 0.0)
        tried = used != self.recycling
        if tried:  # the choice's last figure is stale, replace it
            self.seconds.pop(used, None)
            self.exploring, self.try_cost = False, self.explored - self.granted_at
        self.seconds[used] = _smooth(self.seconds.get(used), seconds)
        if not used:
            self.plain_iterations = _smooth(self.plain_iterations, iterations)
        if plain_seconds is not None and plain_iterations is not None:
            self.shadowed = True
            self.seconds[False] = _smooth(self.seconds.get(False), plain_seconds)
            self.plain_iterations = _smooth(self.plain_iterations, plain_iterations)
        # decide after a try, or while recycling (only back to plain solves: recycling is
        # entered only by a try, which the budget paid; the other figure may be stale)
        if len(self.seconds) < 2 or not (tried or self.recycling):
            self._count_down()
            return
        # recycling must win by 5 % to be chosen (one noisy try should not switch to it)
        best = self.seconds[True] < (0.95 if not self.recycling else 1.0) * self.seconds[False]
        if best != self.recycling:  # the other choice now wins: switch (a grant lapses)
            self.recycling, self.interval, self.exploring = best, FIRST_INTERVAL, False
            self.wait = self.interval
        elif tried:  # a try lost: wait 2× longer (4× when it lost by half)
            lost_by = self.seconds[used] / self.seconds[self.recycling]
            self.interval = min(self.interval * (4 if lost_by > 1.5 else 2), MAX_INTERVAL)
            self.wait = self.interval
        else:
            self._count_down()

    def _count_down(self) -> None:
        """One step less to wait; at the step that starts a try (its harvest when not
        recycling), wait there until the exploration budget grants it."""
        self.wait = max(self.wait - 1, 0)
        start = 0 if self.recycling else 1
        if self.wait <= start and not self.exploring:
            self.wait = start
            if self.recycling and self.shadowed:  # plain seconds come from the shadow
                return
            cost = self.try_cost if self.try_cost is not None else self.seconds.get(
                self.recycling, 0.0)
            self.exploring = self.explored + cost <= self.explore * self.spent
            self.granted_at = self.explored


def _smooth(old: float | None, value: float) -> float:
    return value if old is None else SMOOTHING * value + (1 - SMOOTHING) * old
