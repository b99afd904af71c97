"""Optimisers: batch-first L-BFGS and inexact Newton–Krylov for the lower level, Adam and
gradient descent outside (imports only ``backends``, the array API and NumPy)."""

from framework.optim.lbfgs import lbfgs
from framework.optim.newton import newton_krylov
from framework.optim.outcome import MinimizeStatus
from framework.optim.outer import Adam, GradientDescent, make_optimizer

__all__ = ["Adam", "GradientDescent", "MinimizeStatus", "lbfgs", "make_optimizer", "newton_krylov"]
