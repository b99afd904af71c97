"""Krylov solvers with subspace recycling."""

from framework.krylov.lanczos import LanczosHarvest, LanczosRecorder
from framework.krylov.minres import KrylovResult, Status, rminres
from framework.krylov.recycle_space import RecycleSpace
from framework.krylov.stopping import IterationState, ResidualRule

__all__ = [
    "IterationState",
    "KrylovResult",
    "LanczosHarvest",
    "LanczosRecorder",
    "RecycleSpace",
    "ResidualRule",
    "Status",
    "rminres",
]
