"""``linearize(problem, x, θ)``: ∇²ₓₓf and Jᵀ of one ``ImagingProblem`` at a fixed (x, θ).

The quantities that depend only on (x, θ) (FoE: k_f ∗ x, φ''(k_f ∗ x)·10^{p_f}, φ'; TV:
∇x and its unit directions) are computed once; each ``hvp`` then costs the convolutions
with v only.  Applications are counted in ``problem.counter`` exactly as ``problem.hvp``
and ``problem.jac_t`` count them (a block of b vectors: one pass of b applications).
"""

from __future__ import annotations

from typing import Any

import array_api_compat

from backends.counting import block_size
from problems.base import check_theta, check_vector, from_columns
from problems.batched import batched_regularizer
from problems.imaging import ImagingProblem


class Linearization:
    """Operator-like view of one sample's Hessian (``hvp``) and Jacobian (``jac_t``)."""

    def __init__(self, problem: ImagingProblem, reg_state: Any) -> None:
        self.problem = problem
        self.reg = reg_state
        self.n, self.p = problem.n, problem.p
        self.shape = (problem.n, problem.n)
        self.dtype = problem.dtype

    def __call__(self, v: Any) -> Any:
        return self.hvp(v)

    def hvp(self, v: Any) -> Any:
        """∇²ₓₓf(x, θ) v for v (n,) or (n, b)."""
        pr = self.problem
        check_vector(v, pr.n, "v")
        xp = array_api_compat.array_namespace(v)
        b = block_size(v)
        pr.counter.add("hvp", b)
        out = xp.reshape(self.reg.hvp(xp.reshape(v, (1, pr.n, b))), (pr.n, b))
        cols = xp.reshape(v, (pr.n, b))
        out += pr.operator.normal(cols)
        if pr.epsilon:
            out += pr.epsilon * cols
        return from_columns(xp, out, v.ndim == 1)

    def jac_t(self, w: Any) -> Any:
        """∂θ⟨∇ₓf(x, θ), w⟩ (masked): w (n,) → (p,); w (n, b) → (p, b)."""
        pr = self.problem
        check_vector(w, pr.n, "w")
        xp = array_api_compat.array_namespace(w)
        b = block_size(w)
        pr.counter.add("jac_t", b)
        out = xp.reshape(self.reg.jac_t(xp.reshape(w, (1, pr.n, b))), (pr.p, b))
        out = out * pr.theta_mask[:, None]
        return from_columns(xp, out, w.ndim == 1)


def linearize(problem: ImagingProblem, x: Any, theta: Any) -> Linearization:
    """Freeze (x, θ) of ``problem``; see the module docstring."""
    check_vector(x, problem.n, "x")
    if x.ndim != 1:
        raise ValueError(f"x has shape {tuple(x.shape)}; expected ({problem.n},)")
    xp = array_api_compat.array_namespace(x, theta)
    theta = check_theta(xp, theta, problem.theta_shape)
    kern = batched_regularizer(problem.regularizer)
    state = kern.linearize(xp, xp.reshape(x, (1, problem.n)), theta)
    return Linearization(problem, state)
