"""Optimisers: batch-first L-BFGS and inexact Newton–Krylov for the lower level, Adam and
gradient descent outside (imports only ``backends``, the array API and NumPy)."""

from framework.optim.lbfgs import lbfgs
from framework.optim.line_search import strong_wolfe_search
from framework.optim.newton import Forcing, newton_krylov
from framework.optim.outcome import MinimizeResult, MinimizeStatus
from framework.optim.outer import Adam, GradientDescent, OuterStep, make_optimizer

__all__ = ["Adam", "Forcing", "GradientDescent", "MinimizeResult", "MinimizeStatus", "OuterStep",
           "lbfgs", "make_optimizer", "newton_krylov", "strong_wolfe_search"]
