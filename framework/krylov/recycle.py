"""Carrying a recycle space from one linear system to the next.

After solve t, a ``RecycleHarvester`` (given to ``rminres`` as ``harvest=``) receives the
Lanczos process and chooses the next recycle vectors from W = [U, V] *against the matrix
just solved* ("inner" selection): the projected matrices are formed from W and
HW = [C, V_{m+1}T̄ + CB], which the Lanczos relation gives without any operator
application.  With a cap s on stored Lanczos vectors (``max_vectors``) it compresses
[Z, V_s] to k vectors whenever s columns are complete (a "cycle"), carrying HZ (and JᵀZ)
as linear combinations, so memory stays O(n(k + s)) whatever the iteration count.

Before solve t+1, ``Recycler.prepare`` turns the carry into a ``RecycleSpace`` for
H_{t+1}: C = H_{t+1}U by one block application of k vectors, then an orthonormalising
(rank-revealing) QR/SVD.  "Outer" selection instead keeps all of W and selects against
H_{t+1} (dim W applications, counted by the operator).  The dense oracles ``eig`` and
``gsvd`` select from the whole space (W = I: n applications; tests and small n only).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from array_api_compat import array_namespace
from array_api_compat import device as device_of

from framework.krylov.dense import symmetrize
from framework.krylov.recycle_space import RecycleSpace
from framework.krylov.selection import WHICH, Projection, needs_jacobian, select

STRATEGIES = (
    "none",
    "ritz",
    "harmonic_ritz",
    "rgen_left",
    "rgen_right",
    "rgen_both",
    "eig",
    "gsvd",
)
ORACLES = {"eig": "ritz", "gsvd": "rgen_right"}
Operator = Callable[[Any], Any]


@dataclass(frozen=True)
class RecycleConfig:
    """How the recycle space is chosen and carried.

    ``strategy`` (one of ``STRATEGIES``), ``k`` its dimension, ``which`` end of the
    spectrum (small/large/mix; None = the strategy's default), ``max_vectors`` the cap s on
    stored Lanczos vectors (None = keep all), ``selection`` inner/outer.
    """

    strategy: str = "none"
    k: int = 0
    which: str | None = None
    max_vectors: int | None = None
    selection: str = "inner"
    rank_tol: float = 1e-10

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(
                f"unknown recycle strategy {self.strategy!r}; valid names are "
                f"{', '.join(STRATEGIES)}"
            )
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 0:
            raise ValueError(f"recycle dimension k must be an integer >= 0, got {self.k!r}")
        if self.which is not None and self.which not in WHICH:
            raise ValueError(f"which must be one of {', '.join(WHICH)}, got {self.which!r}")
        if self.max_vectors is not None and self.max_vectors < 1:
            raise ValueError(f"max_vectors must be >= 1 or None, got {self.max_vectors!r}")
        if self.selection not in ("inner", "outer"):
            raise ValueError(f"selection must be 'inner' or 'outer', got {self.selection!r}")

    @property
    def enabled(self) -> bool:
        return self.strategy != "none" and self.k > 0

    @property
    def needs_jacobian(self) -> bool:
        return needs_jacobian(ORACLES.get(self.strategy, self.strategy))


@dataclass(frozen=True)
class RecycleCarry:
    """What travels from one solve to the next: the chosen vectors U (``selected``) or,
    for outer selection, the whole basis W still to be selected against the next matrix."""

    basis: Any
    selected: bool

    @property
    def size(self) -> int:
        return int(self.basis.shape[1])


def _stack(vectors: list[Any]) -> Any:
    xp = array_namespace(vectors[0])
    return xp.stack(vectors, axis=1)


def _hcat(blocks: list[Any]) -> Any:
    blocks = [b for b in blocks if b is not None]
    xp = array_namespace(*blocks)
    return blocks[0] if len(blocks) == 1 else xp.concat(blocks, axis=1)


class RecycleHarvester:
    """A ``Harvester`` that selects the next recycle vectors as the solve runs."""

    def __init__(self, config: RecycleConfig, jac_t: Operator | None = None) -> None:
        if config.needs_jacobian and jac_t is None:
            raise ValueError(f"strategy {config.strategy!r} needs a jac_t operator")
        self.config = config
        self.jac_t = jac_t if config.needs_jacobian else None
        self.cycles = 0
        self._begun = False

    # -- Harvester protocol -------------------------------------------------------------
    def begin(self, U: Any, C: Any, v1: Any, beta1: float) -> None:
        self._begun = True
        self.C = C
        self.Z, self.HZ = U, C
        self.JZ = None  # JᵀZ, formed only when a selection needs it
        self.block = [v1]
        self.v_prev = None
        self.beta_prev = 0.0
        self.alphas: list[float] = []
        self.betas: list[float] = []
        self.bcols: list[Any] = []

    def step(self, alpha: float, beta_next: float, b_col: Any, v_next: Any) -> None:
        self.alphas.append(alpha)
        self.betas.append(beta_next)
        if b_col is not None:
            self.bcols.append(b_col)
        if beta_next > 0.0:
            self.block.append(v_next)
        cap = self.config.max_vectors
        if cap is not None and len(self.alphas) >= cap:
            self._compress()

    def finish(self) -> RecycleCarry | None:
        if not self._begun:
            return None
        if self.config.selection == "outer":
            W, _, _ = self.current_basis(jacobian=False)
            return RecycleCarry(basis=W, selected=False)
        if self.alphas:
            self._compress(final=True)
        return None if self.Z is None else RecycleCarry(basis=self.Z, selected=True)

    # -- internals ----------------------------------------------------------------------
    def _lanczos_products(self) -> tuple[Any, Any]:
        """V (n × m) of the current block and HV = β v_{j−1} + α v_j + β v_{j+1} + C b."""
        m = len(self.alphas)
        V = _stack(self.block[:m])
        xp = array_namespace(V)
        dev = device_of(V)
        zero = xp.zeros_like(V[:, :1])
        first = zero if self.v_prev is None else self.v_prev[:, None]
        down = _hcat([first, V[:, : m - 1]]) if m > 1 else first
        last = self.block[m][:, None] if len(self.block) > m else zero
        up = _hcat([V[:, 1:], last]) if m > 1 else last
        alphas = xp.asarray(self.alphas, dtype=V.dtype, device=dev)
        betas = xp.asarray(self.betas, dtype=V.dtype, device=dev)
        lower = xp.concat([xp.asarray([self.beta_prev], dtype=V.dtype, device=dev), betas[:-1]])
        HV = V * alphas + down * lower + up * betas
        if self.bcols:
            HV = HV + self.C @ _stack(self.bcols)
        return V, HV

    def current_basis(self, *, jacobian: bool = True) -> tuple[Any, Any, Any]:
        """W = [Z, V], HW and JᵀW of the current cycle.  HW comes from the Lanczos
        relation (no operator application); JᵀW (when the strategy needs it and
        ``jacobian``) costs one block application of Jᵀ to the columns not yet seen."""
        want_j = jacobian and self.jac_t is not None
        if want_j and self.Z is not None and self.JZ is None:
            self.JZ = self.jac_t(self.Z)
        if not self.alphas:
            return self.Z, self.HZ, (self.JZ if want_j else None)
        V, HV = self._lanczos_products()
        W, HW = _hcat([self.Z, V]), _hcat([self.HZ, HV])
        if not want_j:
            return W, HW, None
        JV = self.jac_t(V)
        return W, HW, _hcat([self.JZ, JV])

    def _tridiagonal(self, xp: Any, like: Any) -> Any:
        """T̄ (m+1) × m of the current block (a small host-built matrix sent to the
        device once per selection)."""
        m = len(self.alphas)
        rows = [[0.0] * m for _ in range(m + 1)]
        for j in range(m):
            rows[j][j] = self.alphas[j]
            rows[j + 1][j] = self.betas[j]
            if j + 1 < m:
                rows[j][j + 1] = self.betas[j]
        return xp.asarray(rows, dtype=like.dtype, device=device_of(like))

    def projection(self, *, jacobian: bool = True) -> tuple[Any, Projection]:
        """W and its projected matrices for the current cycle, without operator
        applications (JᵀW excepted, see ``current_basis``).

        First cycle (W = [U, V_m], C = HU orthonormal, V ⟂ C, VᵀV = I): the Lanczos
        relation gives WᵀW = [[UᵀU, UᵀV], [VᵀU, I]], WᵀHW = blockdiag(UᵀC, T_m) and
        (HW)ᵀ(HW) = [[CᵀC, B], [Bᵀ, T̄ᵀT̄ + BᵀB]] at O(nkm) cost.  Later cycles
        (compressed Z) form the Gram matrices of W and HW explicitly (O(n d²)).
        """
        if self.cycles > 0 or not self.alphas:
            W, HW, JW = self.current_basis(jacobian=jacobian)
            return W, Projection.from_products(W, HW, JW)
        want_j = jacobian and self.jac_t is not None
        m = len(self.alphas)
        V = _stack(self.block[:m])
        xp = array_namespace(V)
        Tbar = self._tridiagonal(xp, V)
        T = symmetrize(Tbar[:m, :])
        TtT = xp.matrix_transpose(Tbar) @ Tbar
        JV = self.jac_t(V) if want_j else None
        if self.Z is None:
            eye = xp.eye(m, dtype=V.dtype, device=device_of(V))
            return V, Projection(gram=eye, G=T, F=TtT, P=JV)
        U, C = self.Z, self.HZ
        Ut = xp.matrix_transpose(U)
        k = int(U.shape[1])
        UtV = Ut @ V
        Bm = _stack(self.bcols)
        Bt = xp.matrix_transpose(Bm)
        eye = xp.eye(m, dtype=V.dtype, device=device_of(V))
        zeros = xp.zeros((k, m), dtype=V.dtype, device=device_of(V))
        gram = xp.concat([xp.concat([Ut @ U, UtV], axis=1),
                          xp.concat([xp.matrix_transpose(UtV), eye], axis=1)], axis=0)
        G = xp.concat([xp.concat([symmetrize(Ut @ C), zeros], axis=1),
                       xp.concat([xp.matrix_transpose(zeros), T], axis=1)], axis=0)
        F = xp.concat([xp.concat([xp.matrix_transpose(C) @ C, Bm], axis=1),
                       xp.concat([Bt, TtT + Bt @ Bm], axis=1)], axis=0)
        P = None
        if want_j:
            if self.JZ is None:
                self.JZ = self.jac_t(U)
            P = _hcat([self.JZ, JV])
        return _hcat([U, V]), Projection(gram=symmetrize(gram), G=G, F=symmetrize(F), P=P)

    def _compress(self, *, final: bool = False) -> None:
        cfg = self.config
        W, proj = self.projection()
        Y = select(proj, cfg.strategy, cfg.k, cfg.which)
        if not final:
            # the next cycle needs HZ: form HW (no applications) for the chosen vectors
            _, HW, _ = self.current_basis(jacobian=False)
            self.HZ = HW @ Y
        self.Z = W @ Y
        self.JZ = None if proj.P is None else proj.P @ Y
        m = len(self.alphas)
        self.v_prev = self.block[m - 1]
        self.beta_prev = self.betas[m - 1]
        self.block = self.block[m:]
        self.alphas, self.betas, self.bcols = [], [], []
        self.cycles += 1


class Recycler:
    """Turns carries into recycle spaces for the next operator, per ``RecycleConfig``."""

    def __init__(self, config: RecycleConfig) -> None:
        self.config = config

    def harvester(self, jac_t: Operator | None = None) -> RecycleHarvester | None:
        """A fresh harvester for one solve (None when nothing needs harvesting)."""
        if not self.config.enabled or self.config.strategy in ORACLES:
            return None
        return RecycleHarvester(self.config, jac_t)

    def prepare(
        self,
        carry: RecycleCarry | None,
        H: Operator,
        jac_t: Operator | None = None,
        *,
        like: Any = None,
    ) -> RecycleSpace | None:
        """The recycle space for operator ``H`` (k applications for C = HU; outer
        selection: dim W applications; the oracles: n, building H densely from an
        identity shaped, typed and placed like the vector ``like``)."""
        cfg = self.config
        if not cfg.enabled:
            return None
        if cfg.strategy in ORACLES:
            if like is None:
                raise ValueError("oracle strategies need like= (a vector of the system)")
            return self._oracle(H, jac_t, like)
        if carry is None:
            return None
        if carry.selected:
            return RecycleSpace.from_basis(H, carry.basis, rank_tol=cfg.rank_tol)
        W = carry.basis
        HW = H(W)
        JW = jac_t(W) if cfg.needs_jacobian else None
        Y = select(Projection.from_products(W, HW, JW), cfg.strategy, cfg.k, cfg.which)
        return RecycleSpace.from_products(W @ Y, HW @ Y, rank_tol=cfg.rank_tol)

    def carry_after(self, result: Any, space: RecycleSpace | None) -> RecycleCarry | None:
        """The carry after a solve: its harvest, or the unchanged space when the solve
        made no Lanczos step (e.g. converged at the start)."""
        if result.harvest is not None:
            return result.harvest
        if space is not None and self.config.strategy not in ORACLES:
            return RecycleCarry(basis=space.U, selected=True)
        return None

    def _oracle(self, H: Operator, jac_t: Operator | None, like: Any) -> RecycleSpace | None:
        xp = array_namespace(like)
        eye = xp.eye(like.shape[0], dtype=like.dtype, device=device_of(like))
        HI = H(eye)
        JI = jac_t(eye) if self.config.needs_jacobian else None
        strategy = ORACLES[self.config.strategy]
        proj = Projection.from_products(eye, HI, JI)
        Y = select(proj, strategy, self.config.k, self.config.which)
        return RecycleSpace.from_products(Y, HI @ Y, rank_tol=self.config.rank_tol)
