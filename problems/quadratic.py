"""A closed-form test problem: f_i(x, θ) = ½‖A_i x − y_i‖² + ½ Σ_j exp(θ_j) ‖D_ij x‖².

x_i(θ) = (A_iᵀA_i + Σ_j e^{θ_j} G_ij)⁻¹ A_iᵀy_i with G_ij = D_ijᵀD_ij, and the
hypergradient of ℓ_i(x) = ½‖x − x_true,i‖² is −Jᵀ H⁻¹ (x − x_true,i) with
J[:, j] = e^{θ_j} G_ij x: ``exact_solution`` / ``exact_hypergradient`` compute both
densely on the host, as test references.  B samples (one seed each); ``concat`` joins them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import array_api_compat
import numpy as np

from backends.core import get_backend
from backends.counting import Counter
from problems.base import Linearization, Problem, check_agree, check_theta


class QuadraticProblem(Problem):
    """Dense, seeded sample of size ``n`` with ``num_terms`` regularisers: D_1, D_2 the first
    and second differences, further D_j random n×n Gaussian matrices scaled by 1/√n; A the
    identity plus a random Gaussian perturbation of norm about ``coupling``; y = A x_true +
    relative noise.  ``backend`` holds the arrays (NumPy when omitted)."""

    def __init__(
        self,
        n: int = 30,
        num_terms: int = 3,
        *,
        seed: int = 0,
        noise_level: float = 0.1,
        coupling: float = 0.5,
        backend: Any = None,
    ) -> None:
        if n < 3:
            raise ValueError(f"n must be at least 3; got n={n!r}")
        rng = np.random.default_rng(seed)
        a = np.eye(n) + coupling * rng.standard_normal((n, n)) / (2.0 * np.sqrt(n))
        ds = [  # differences of order 1 and 2 zero-padded to n rows, then random matrices
            np.vstack([np.diff(np.eye(n), i + 1, axis=0), np.zeros((i + 1, n))]) if i < 2
            else rng.standard_normal((n, n)) / np.sqrt(n)
            for i in range(num_terms)
        ]
        t = np.linspace(0.0, 1.0, n)
        x_true = np.sin(2 * np.pi * t) + 0.5 * (t > 0.5)
        clean = a @ x_true
        e = rng.standard_normal(n)
        y = clean + noise_level * np.linalg.norm(clean) * e / np.linalg.norm(e)
        g = np.stack([d.T @ d for d in ds])  # (q, n, n)
        self._setup((a[None], g[None], y[None], x_true[None]),
                    backend if backend is not None else get_backend("numpy"), None)

    def _setup(self, host: tuple[np.ndarray, ...], backend: Any, counter: Counter | None) -> None:
        """Host data (A, G, y, x_true) with a leading sample axis → device arrays."""
        self._backend, self._host = backend, host
        a, g, y, x_true = self._a_rows, self._g_rows, self._y_rows, self._x_true_rows = host
        self.batch_size, self.n = int(a.shape[0]), int(a.shape[1])
        self.image_shape = (self.n,)
        self.theta_shape = (int(g.shape[1]),)
        self.p = self.theta_shape[0]
        self.xp, self.device, self.dtype = backend.xp, backend.device, backend.dtype
        self.counter = counter if counter is not None else Counter()
        self.A = backend.asarray(a)  # (B, n, n)
        self.AtA = backend.asarray(np.matmul(np.swapaxes(a, 1, 2), a))
        self.G = backend.asarray(g)  # (B, q, n, n)
        self.Y = backend.asarray(y)
        self.Aty = backend.asarray(np.einsum("bji,bj->bi", a, y))
        self.X_true = backend.asarray(x_true)
        self.theta_mask = backend.asarray(np.ones(self.p))

    @classmethod
    def concat(
        cls, problems: Sequence[QuadraticProblem], *, counter: Counter | None = None
    ) -> QuadraticProblem:
        """The samples of ``problems`` (same n, number of terms and backend) as one batch."""
        first = check_agree("problems", problems, {
            "n": lambda pr: pr.n, "theta shape": lambda pr: pr.theta_shape}, QuadraticProblem)
        host = tuple(np.concatenate([pr._host[k] for pr in problems]) for k in range(4))
        return cls._from_host(host, first._backend, counter)

    def _select(self, rows: tuple[int, ...]) -> QuadraticProblem:
        return self._from_host(tuple(h[list(rows)] for h in self._host), self._backend,
                               self.counter)

    @classmethod
    def _from_host(cls, host: tuple[np.ndarray, ...], backend: Any,
                   counter: Counter | None) -> QuadraticProblem:
        out = cls.__new__(cls)
        out._setup(host, backend, counter)
        return out

    def __repr__(self) -> str:
        return (f"QuadraticProblem(batch_size={self.batch_size}, n={self.n}, "
                f"num_terms={self.theta_shape[0]})")

    def _weights(self, theta: Any) -> Any:
        return self.xp.exp(check_theta(self.xp, theta, self.theta_shape))

    def _reg_matvec(self, weights: Any, v3: Any) -> Any:
        """Σ_j e^{θ_j} G_ij v_i for blocks (B, n, b) → (B, n, b)."""
        xp = self.xp
        gv = xp.matmul(self.G, v3[:, None, :, :])  # (B, q, n, b)
        return xp.sum(weights[None, :, None, None] * gv, axis=1)

    def _rows_value_and_grad(
        self, X: Any, theta: Any, *, value: bool, grad: bool
    ) -> tuple[Any, Any]:
        xp = array_api_compat.array_namespace(X)
        x3 = X[:, :, None]
        reg = self._reg_matvec(self._weights(theta), x3)[:, :, 0]
        out_value = out_grad = None
        if value:
            r = xp.matmul(self.A, x3)[:, :, 0] - self.Y
            out_value = 0.5 * xp.sum(r * r, axis=1) + 0.5 * xp.sum(X * reg, axis=1)
        if grad:
            out_grad = xp.matmul(self.AtA, x3)[:, :, 0] - self.Aty + reg
        return out_value, out_grad

    def linearize(self, x: Any, theta: Any) -> Linearization:
        """H_i = A_iᵀA_i + Σ_j e^{θ_j} G_ij and Jᵀ: w ↦ (e^{θ_j} x_iᵀG_ij w)_j at (x, θ)."""
        X, single = self._rows(x)
        xp = self.xp
        weights = self._weights(theta)
        gx = xp.matmul(self.G, X[:, None, :, None])[..., 0]  # (B, q, n): G_ij x_i

        def hvp3(v3: Any) -> Any:
            return xp.matmul(self.AtA, v3) + self._reg_matvec(weights, v3)

        def jac_t3(w3: Any) -> Any:
            return weights[None, :, None] * xp.matmul(gx, w3)  # (B, q, b); G_ij symmetric

        return Linearization(self, hvp3, jac_t3, single=single)

    # -- host references (sample ``sample`` of the batch) ---------------------------------
    @property
    def _x_true_host(self) -> np.ndarray:
        return self._sample_row(self._x_true_rows, "x_true")

    @property
    def _g_host(self) -> np.ndarray:
        """G_j = D_jᵀD_j (q, n, n)."""
        return self._sample_row(self._g_rows, "G")

    def _hessian_host(self, theta: Any, sample: int = 0) -> tuple[np.ndarray, np.ndarray]:
        t = np.asarray(theta, dtype=np.float64).reshape(self.theta_shape)
        w = np.exp(t)
        a = self._a_rows[sample]
        return a.T @ a + np.einsum("i,ijk->jk", w, self._g_rows[sample]), w

    def exact_solution(self, theta: Any, sample: int = 0) -> np.ndarray:
        """x_i(θ) by a dense solve on the host (θ given as host data)."""
        h, _ = self._hessian_host(theta, sample)
        rhs = self._a_rows[sample].T @ self._y_rows[sample]
        return np.linalg.solve(h, rhs)

    def exact_hypergradient(self, theta: Any, sample: int = 0) -> np.ndarray:
        """∇θ ℓ_i(x_i(θ)) = −Jᵀ H⁻¹ (x_i(θ) − x_true,i) on the host, shape (q,)."""
        h, w = self._hessian_host(theta, sample)
        x = self.exact_solution(theta, sample)
        v = np.linalg.solve(h, x - self._x_true_rows[sample])
        jac = w[None, :] * np.einsum("ijk,k->ji", self._g_rows[sample], x)  # (n, q)
        return -jac.T @ v
