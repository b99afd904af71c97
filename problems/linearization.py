"""``Linearization``: ∇²ₓₓf and Jᵀ of a batch-first problem frozen at (X, θ).

The problem computes once what depends only on (X, θ) and hands over two kernels on blocks,
``hvp3`` (B, n, b) → (B, n, b) and ``jac_t3`` (B, n, b) → (B, p, b).  This object promotes
inputs (v (n,) or (n, b) for one point; V (B, n) or (B, n, b)), counts each call as one pass
of B·b applications in ``problem.counter``, masks Jᵀ by ``problem.theta_mask`` and unwraps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import array_api_compat

from problems.base import as_blocks, from_blocks

BlockKernel = Callable[[Any], Any]


class Linearization:
    """Operator-like view of the Hessians (``hvp``, also ``__call__``) and Jᵀ (``jac_t``)."""

    def __init__(
        self, problem: Any, hvp3: BlockKernel, jac_t3: BlockKernel, *, single: bool
    ) -> None:
        self.problem = problem
        self._hvp3, self._jac_t3 = hvp3, jac_t3
        self.single = single
        self.batch_size, self.n, self.p = problem.batch_size, problem.n, problem.p
        self.shape = (problem.n, problem.n)
        self.dtype = problem.dtype

    def __call__(self, v: Any) -> Any:
        return self.hvp(v)

    def hvp(self, v: Any) -> Any:
        """∇²ₓₓf_i v_i, shaped like v."""
        v3 = as_blocks(v, self.n, self.batch_size, self.single, "v")
        self.problem.counter.add("hvp", self.batch_size * int(v3.shape[2]))
        out = self._hvp3(v3)
        return from_blocks(array_api_compat.array_namespace(v), out, v.ndim, self.single)

    def jac_t(self, w: Any) -> Any:
        """∂θ⟨∇ₓf_i, w_i⟩ masked by ``theta_mask``: (n,) → (p,), (n, b) → (p, b);
        (B, n) → (B, p), (B, n, b) → (B, p, b)."""
        w3 = as_blocks(w, self.n, self.batch_size, self.single, "w")
        self.problem.counter.add("jac_t", self.batch_size * int(w3.shape[2]))
        out = self._jac_t3(w3)
        out *= self.problem.theta_mask[None, :, None]
        return from_blocks(array_api_compat.array_namespace(w), out, w.ndim, self.single)
