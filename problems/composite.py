"""A sum of regularisers R_θ(x) = Σ_k R_k(x; θ_k) with θ the concatenation of the parts'
flattened parameters (e.g. Huber-TV plus a Field of Experts: ``tv_foe``).  Value, gradient,
Hessian-vector products and Jᵀ are the parts' own, summed or stacked."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from problems.base import RowRegularizer, check_theta


class SumRegularizer(RowRegularizer):
    """Σ_k R_k over ``parts`` (regularisers of one image shape); θ is flat, part k's
    parameters at ``offsets[k]:offsets[k + 1]`` in its own ``theta_shape``."""

    def __init__(self, parts: Sequence[RowRegularizer]) -> None:
        if len(parts) < 2:
            raise ValueError(f"a sum needs at least two regularisers; got {len(parts)}")
        shapes = {tuple(p.image_shape) for p in parts}
        if len(shapes) != 1:
            raise ValueError(f"the parts act on different image shapes {sorted(shapes)}")
        super().__init__(parts[0].image_shape)
        self.parts = tuple(parts)
        sizes = [math.prod(p.theta_shape) for p in parts]
        self.offsets = tuple(int(v) for v in np.cumsum([0, *sizes]))
        self.theta_shape = (self.offsets[-1],)

    def __repr__(self) -> str:
        return f"SumRegularizer({', '.join(repr(p) for p in self.parts)})"

    def mask_host(self) -> np.ndarray:
        return np.concatenate([np.asarray(p.mask_host()).reshape(-1) for p in self.parts])

    def log_weight_mask_host(self) -> np.ndarray:
        return np.concatenate([np.asarray(p.log_weight_mask_host()).reshape(-1)
                               for p in self.parts])

    def split(self, xp: Any, theta: Any) -> list[Any]:
        """Each part's θ, in its own shape."""
        theta = check_theta(xp, theta, self.theta_shape)
        return [xp.reshape(theta[a:b], tuple(p.theta_shape))
                for p, a, b in zip(self.parts, self.offsets[:-1], self.offsets[1:], strict=True)]

    def rows_value_and_grad(
        self, xp: Any, X: Any, theta: Any, *, value: bool = True, grad: bool = True
    ) -> tuple[Any, Any]:
        outs = [p.rows_value_and_grad(xp, X, t, value=value, grad=grad)
                for p, t in zip(self.parts, self.split(xp, theta), strict=True)]
        total_value, total_grad = outs[0]
        for part_value, part_grad in outs[1:]:
            total_value = total_value + part_value if value else None
            total_grad = total_grad + part_grad if grad else None
        return total_value, total_grad

    def linearize(self, xp: Any, X: Any, theta: Any) -> SumLinearization:
        return SumLinearization(xp, [p.linearize(xp, X, t) for p, t in
                                     zip(self.parts, self.split(xp, theta), strict=True)])


class SumLinearization:
    """The parts' linearizations: ∇²R V = Σ_k ∇²R_k V; Jᵀ stacks the parts' rows."""

    def __init__(self, xp: Any, parts: Sequence[Any]) -> None:
        self.xp, self.parts = xp, tuple(parts)

    def hvp(self, v3: Any) -> Any:
        out = self.parts[0].hvp(v3)
        for part in self.parts[1:]:
            out += part.hvp(v3)
        return out

    def jac_t(self, w3: Any) -> Any:
        """(B, n, b) → (B, p, b), the parts' Jᵀ in θ's order."""
        return self.xp.concat([part.jac_t(w3) for part in self.parts], axis=1)
