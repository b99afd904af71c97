"""Optimisers: batch-first L-BFGS for the lower level, Adam and gradient descent outside.

Imports only ``backends``, the array API and NumPy on the host.
"""

from framework.optim.lbfgs import LBFGSResult, LBFGSStatus, lbfgs
from framework.optim.line_search import strong_wolfe_search
from framework.optim.outer import Adam, GradientDescent, OuterStep, make_optimizer

__all__ = [
    "Adam",
    "GradientDescent",
    "LBFGSResult",
    "LBFGSStatus",
    "OuterStep",
    "lbfgs",
    "make_optimizer",
    "strong_wolfe_search",
]
