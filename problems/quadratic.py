"""A closed-form test problem: f(x, θ) = ½‖Ax − y‖² + ½ Σ_i exp(θ_i) ‖D_i x‖².

x(θ) = (AᵀA + Σ_i e^{θ_i} D_iᵀD_i)⁻¹ Aᵀy, and the hypergradient of ℓ(x) = ½‖x − x_true‖²
is −Jᵀ H⁻¹ (x − x_true) with J[:, i] = e^{θ_i} D_iᵀD_i x: both computed densely on the host
by ``exact_solution`` / ``exact_hypergradient`` as references for tests.
"""

from __future__ import annotations

from typing import Any

import array_api_compat
import numpy as np
import scipy.linalg

from backends.counting import Counter, block_size
from problems.base import SquaredErrorUpperLoss, check_theta, check_vector


def _difference_matrix(n: int, order: int) -> np.ndarray:
    d = np.eye(n)
    for _ in range(order):
        d = d[1:] - d[:-1]
    return d


class QuadraticProblem(SquaredErrorUpperLoss):
    """Dense, seeded problem of size ``n`` with ``num_terms`` regularisers.

    D_1 is the first difference, D_2 the second difference, further D_i are random
    n×n Gaussian matrices scaled by 1/√n.  A is the identity plus a random n×n Gaussian
    perturbation of norm about ``coupling``; y = A x_true + relative noise.
    ``backend`` (from ``backends.get_backend``) holds the arrays (NumPy when omitted).
    """

    def __init__(
        self,
        n: int = 30,
        num_terms: int = 3,
        *,
        seed: int = 0,
        noise_level: float = 0.1,
        coupling: float = 0.5,
        backend: Any = None,
        counter: Counter | None = None,
    ) -> None:
        if n < 3:
            raise ValueError(f"n must be at least 3; got n={n!r}")
        if num_terms < 1:
            raise ValueError(f"num_terms must be positive; got num_terms={num_terms!r}")
        if backend is None:
            from backends.core import get_backend

            backend = get_backend("numpy")
        rng = np.random.default_rng(seed)
        a = np.eye(n) + coupling * rng.standard_normal((n, n)) / (2.0 * np.sqrt(n))
        ds = []
        for i in range(num_terms):
            if i < 2:
                d = _difference_matrix(n, i + 1)
                ds.append(np.vstack([d, np.zeros((n - d.shape[0], n))]))
            else:
                ds.append(rng.standard_normal((n, n)) / np.sqrt(n))
        t = np.linspace(0.0, 1.0, n)
        x_true = np.sin(2 * np.pi * t) + 0.5 * (t > 0.5)
        clean = a @ x_true
        e = rng.standard_normal(n)
        y = clean + noise_level * np.linalg.norm(clean) * e / np.linalg.norm(e)

        self._a_host = a
        self._g_host = np.stack([d.T @ d for d in ds])  # (q, n, n)
        self._y_host = y
        self._x_true_host = x_true
        self.n = n
        self.image_shape = (n,)
        self.theta_shape = (num_terms,)
        self.xp = backend.xp
        self.device = backend.device
        self.dtype = backend.dtype
        self.counter = counter if counter is not None else Counter()
        self.A = backend.asarray(a)
        self.AtA = backend.asarray(a.T @ a)
        self.G = backend.asarray(self._g_host)
        self.y = backend.asarray(y)
        self.Aty = backend.asarray(a.T @ y)
        self.x_true = backend.asarray(x_true)
        self.theta_mask = backend.asarray(np.ones(num_terms))

    def __repr__(self) -> str:
        return f"QuadraticProblem(n={self.n}, num_terms={self.theta_shape[0]})"

    def _weights(self, theta: Any) -> Any:
        return self.xp.exp(check_theta(self.xp, theta, self.theta_shape))

    def _reg_matvec(self, theta: Any, v: Any) -> Any:
        """Σ_i e^{θ_i} G_i v for v (n,) or (n, b)."""
        xp = self.xp
        gv = xp.matmul(self.G, v if v.ndim == 2 else v[:, None])  # (q, n, b)
        out = xp.sum(self._weights(theta)[:, None, None] * gv, axis=0)
        return out if v.ndim == 2 else out[:, 0]

    def lower_objective(self, x: Any, theta: Any) -> Any:
        check_vector(x, self.n, "x")
        self.counter.add("f")
        xp = array_api_compat.array_namespace(x)
        r = xp.matmul(self.A, x) - self.y
        return 0.5 * xp.sum(r * r) + 0.5 * xp.sum(x * self._reg_matvec(theta, x))

    def lower_grad(self, x: Any, theta: Any) -> Any:
        check_vector(x, self.n, "x")
        self.counter.add("grad")
        return self.xp.matmul(self.AtA, x) - self.Aty + self._reg_matvec(theta, x)

    def hvp(self, x: Any, theta: Any, v: Any) -> Any:
        check_vector(x, self.n, "x")
        check_vector(v, self.n, "v")
        self.counter.add("hvp", block_size(v))
        return self.xp.matmul(self.AtA, v) + self._reg_matvec(theta, v)

    def jac_t(self, x: Any, theta: Any, w: Any) -> Any:
        """∂θ_i⟨∇ₓf, w⟩ = e^{θ_i} xᵀG_i w: w (n,) → (q,), w (n, b) → (q, b)."""
        check_vector(x, self.n, "x")
        check_vector(w, self.n, "w")
        self.counter.add("jac_t", block_size(w))
        xp = self.xp
        weights = self._weights(theta)
        gxw = xp.matmul(xp.matmul(self.G, x), w)  # G_i x is (q, n) as G_i is symmetric
        return (weights[:, None] if w.ndim == 2 else weights) * gxw

    # -- host references ---------------------------------------------------------------
    def _hessian_host(self, theta: Any) -> tuple[np.ndarray, np.ndarray]:
        t = np.asarray(theta, dtype=np.float64).reshape(self.theta_shape)
        w = np.exp(t)
        return self._a_host.T @ self._a_host + np.einsum("i,ijk->jk", w, self._g_host), w

    def exact_solution(self, theta: Any) -> np.ndarray:
        """x(θ) by a dense Cholesky solve on the host (θ given as host data)."""
        h, _ = self._hessian_host(theta)
        return scipy.linalg.solve(h, self._a_host.T @ self._y_host, assume_a="pos")

    def exact_hypergradient(self, theta: Any) -> np.ndarray:
        """∇θ ℓ(x(θ)) = −Jᵀ H⁻¹ (x(θ) − x_true) on the host, shape (q,)."""
        h, w = self._hessian_host(theta)
        x = scipy.linalg.solve(h, self._a_host.T @ self._y_host, assume_a="pos")
        v = scipy.linalg.solve(h, x - self._x_true_host, assume_a="pos")
        jac = w[None, :] * np.einsum("ijk,k->ji", self._g_host, x)  # (n, q)
        return -jac.T @ v
