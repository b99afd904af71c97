"""Krylov solvers with subspace recycling."""

from framework.krylov.lanczos import Harvester, LanczosHarvest, LanczosRecorder
from framework.krylov.minres import KrylovResult, Status, rminres
from framework.krylov.recycle_space import RecycleSpace
from framework.krylov.stopping import IterationState, ResidualRule, StopRule

__all__ = [
    "Harvester",
    "IterationState",
    "KrylovResult",
    "LanczosHarvest",
    "LanczosRecorder",
    "RecycleSpace",
    "ResidualRule",
    "Status",
    "StopRule",
    "rminres",
]
