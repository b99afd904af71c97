"""Carrying recycle spaces from one batch of linear systems to the next.

A ``RecycleHarvester`` (``rminres(harvest=...)``) chooses each sample's next vectors from
W_i = [U_i, V_i] against the matrix just solved ("inner" selection), HW coming from the
Lanczos relation (no operator application), compressing [Z, V_s] to k vectors every s
stored Lanczos vectors (a "cycle"); ``Recycler.prepare`` turns the carry into the next H's
``RecycleSpace``.  "Outer" selection keeps all of W and selects against the next H; the
dense oracles ``eig`` and ``gsvd`` select from the whole space (README, "Recycling without
extra operator applications").
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from array_api_compat import array_namespace
from array_api_compat import device as device_of

from backends.choice import Choice
from framework.krylov.operators import Operator, RowOperator
from framework.krylov.recycle_space import RecycleSpace, widths
from framework.krylov.selection import Projection, Strategy, Which, needs_jacobian, select

ORACLES = {Strategy.eig: Strategy.ritz, Strategy.gsvd: Strategy.rgen_right}
Selection = Choice("Selection", "inner outer")  # (see the module docstring)


@dataclass
class RecycleConfig:
    """How the recycle space is chosen and carried (the config group ``recycle``):
    ``strategy``, ``dim`` the recycle dimension k, ``which`` end of the spectrum (None: the
    strategy's default), ``max_vectors`` the cap s on stored Lanczos vectors (None: all;
    memory n·(k + s + 10) per sample), ``selection``, ``rank_tol`` the relative rank cut of
    the space; ``adaptive``: the bilevel engine recycles (at most ``dim`` vectors) only
    while it pays in measured seconds (``framework.bilevel.adaptive``)."""

    strategy: Strategy = Strategy.none
    dim: int = 0
    which: Which | None = None
    max_vectors: int | None = 200
    selection: Selection = Selection.inner
    rank_tol: float = 1e-10
    adaptive: bool = False

    def __post_init__(self) -> None:
        self.strategy, self.selection = Strategy(self.strategy), Selection(self.selection)
        self.which = None if self.which is None else Which(self.which)
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 0:
            raise ValueError(f"recycle dimension dim must be an integer >= 0, got {self.dim!r}")
        if self.max_vectors is not None and self.max_vectors < 1:
            raise ValueError(f"max_vectors must be >= 1 or None, got {self.max_vectors!r}")

    @property
    def enabled(self) -> bool:
        return self.strategy != Strategy.none and self.dim > 0

    @property
    def needs_jacobian(self) -> bool:
        return needs_jacobian(ORACLES.get(self.strategy, self.strategy))


@dataclass(frozen=True)
class RecycleCarry:
    """What travels from one solve to the next: the chosen vectors U (``selected``) or,
    for outer selection, the whole basis W still to be selected against the next matrix;
    (B, n, D) with zero padding columns, or (n, D) for one system."""

    basis: Any
    selected: bool

    @property
    def size(self) -> int:
        """Vectors carried (the largest count of a batch)."""
        return max(widths(self.basis if self.basis.ndim == 3 else self.basis[None, ...]))

    def sample(self, i: int) -> RecycleCarry:
        """Sample i's carry, (n, D_i) without its padding columns."""
        width = widths(self.basis[i:i + 1, ...])[0]
        return RecycleCarry(self.basis[i, :, :width], self.selected)


def stack_carries(carries: list[RecycleCarry | None], like: Any) -> RecycleCarry | None:
    """Per-sample carries (n, D_i) (or None) as one (B, n, max D_i) carry, zero-padded."""
    present = [c for c in carries if c is not None]
    if not present:
        return None
    xp = array_namespace(like)
    width = max(int(c.basis.shape[1]) for c in present)
    pad = xp.zeros((int(like.shape[-1]), width), dtype=like.dtype, device=device_of(like))
    rows = [pad if c is None else xp.concat([c.basis, pad[:, : width - c.basis.shape[1]]],
                                            axis=1) for c in carries]
    return RecycleCarry(xp.stack(rows), present[0].selected)


ROWS = 1024  # the compression forms W in blocks of rows (see ``_compress``)


class RecycleHarvester:
    """Selects each sample's next recycle vectors as the solve runs: it keeps references to
    the solver's Lanczos vectors and, at a compression, forms W = [Z, V], HW and their
    projections in blocks of rows, writing Z = W·Y and HZ = HW·Y in place once they are its
    own (working memory: s + 1 Lanczos vectors, Z, HZ and about three vectors of blocks;
    RGen applies Jᵀ to a cycle's stacked V, m vectors more)."""

    def __init__(self, config: RecycleConfig, jac_t: Operator | None = None) -> None:
        if config.needs_jacobian and jac_t is None:
            raise ValueError(f"strategy {config.strategy!r} needs a jac_t operator")
        self.config = config
        self.jac_t = jac_t if config.needs_jacobian else None
        self.cycles = 0
        self.steps: list[tuple[Any, Any, Any, Any]] | None = None  # (α, β_{j+1}, b_j, updated)

    def begin(self, space: RecycleSpace | None, v1: Any, u1: Any, beta1: Any) -> None:
        xp = array_namespace(v1)
        self.preconditioned = u1 is not None  # u: residual-space vectors, v = M u
        if self.preconditioned and space is not None and space.MinvU is None:
            raise ValueError("harvesting a preconditioned solve needs the space's M⁻¹U: "
                             "build it with RecycleSpace.from_basis(A, Y, M=M)")
        U, self.C = (None, None) if space is None else (space.U, space.C)
        self.MC = self.C if space is None or space.MC is None else space.MC
        self.Z, self.HZ, self.JZ = U, self.C, None  # JᵀZ formed only when a selection needs it
        # with M: Zres = M⁻¹Z (the carried form) and MHZ = M·HZ
        self.Zres, self.MHZ = (None, None) if space is None else (space.MinvU, space.MC)
        self.owned = False  # Z, HZ are the caller's U, C until the first compression
        self.zvalid = None if U is None else xp.linalg.vector_norm(U, axis=-2) > 0
        self.block, self.steps = [v1], []  # the cycle's Lanczos vectors and steps
        self.ublock = [u1] if self.preconditioned else self.block
        self.v_prev = self.u_prev = None
        self.beta_prev = xp.zeros_like(beta1)

    def step(self, alpha: Any, beta_next: Any, b_col: Any, v_next: Any, u_next: Any,
             update: Any) -> None:
        self.steps.append((alpha, beta_next, b_col, update))
        self.block.append(v_next)
        if self.preconditioned:
            self.ublock.append(u_next)
        cap = self.config.max_vectors
        if cap is not None and len(self.steps) >= cap:
            self._compress(final=False)

    def finish(self) -> RecycleCarry | None:
        if self.steps is None:  # no solve began
            return None
        if self.config.selection == "outer":
            W, _, _, Wres, _ = self._basis(jacobian=False)
            return None if W is None else RecycleCarry(W if Wres is None else Wres,
                                                       selected=False)
        if self.steps:
            self._compress(final=True)
        self.block = self.ublock = []
        self.v_prev = self.u_prev = None
        if self.Z is None:
            return None
        carried = self.Zres if self.preconditioned else self.Z
        return RecycleCarry(carried[..., :max(widths(self.Z))], selected=True)

    def _terms(self) -> tuple[Any, ...]:
        """The cycle's Lanczos scalars as (B, m) arrays (α, β_{j+1}, β_j), B = (MC)ᵀAV
        (B, k, m) or None, and the (B, m) mask of the samples' own steps; sets
        ``self.valid``, the (B, D) mask of W's valid columns."""
        xp = array_namespace(self.block[0])
        m = len(self.steps)
        alphas, betas, bcols, updated = zip(*self.steps, strict=True)
        betas = xp.stack(betas, axis=1)
        lower = xp.concat([self.beta_prev[:, None], betas[:, : m - 1]], axis=1)
        vvalid = xp.stack(updated, axis=1)
        masks = [vvalid] if self.Z is None else [self.zvalid, vvalid]
        self.valid = xp.concat(masks, axis=1)
        bmat = None if bcols[0] is None else xp.stack(bcols, axis=2)
        return xp.stack(alphas, axis=1), betas, lower, bmat, vvalid

    @staticmethod
    def _relation(vectors: list[Any], prev: Any, C: Any, rows: slice,
                  terms: tuple[Any, ...]) -> tuple[Any, Any]:
        """The m vectors w_j restricted to ``rows`` and β_j w_{j−1} + α_j w_j + β_{j+1}
        w_{j+1} + C b_j, summed in that order (the Lanczos relation: with w = v, C the
        space's C, it is AV; with M, w = u gives AV and w = v, C = MC gives M·AV)."""
        xp = array_namespace(vectors[0])
        alphas, betas, lower, bmat, _ = terms
        m = alphas.shape[1]
        Vall = xp.stack([v[:, rows] for v in vectors[: m + 1]], axis=2)  # (B, r, m + 1)
        V = Vall[:, :, :m]
        HV = V * alphas[:, None, :]
        if prev is not None:
            HV[:, :, :1] += prev[:, rows, None] * lower[:, None, :1]
        if m > 1:
            HV[:, :, 1:] += V[:, :, : m - 1] * lower[:, None, 1:]
        HV += Vall[:, :, 1:] * betas[:, None, :]
        if bmat is not None:
            HV += C[:, rows, :] @ bmat
        return V, HV

    def _rows(self, rows: slice, terms: tuple[Any, ...]) -> tuple[Any, Any, Any, Any]:
        """W = [Z, V] and HW restricted to ``rows``, invalid columns zeroed, from the
        Lanczos relation (no operator application); with a preconditioner also W's
        residual form M⁻¹W = [Zres, U] and M·HW (else None, None).  Without one, at most
        three blocks of the rows' size are alive at a time."""
        xp = array_namespace(self.block[0])
        vmask = xp.astype(terms[-1], self.block[0].dtype)[:, None, :]
        V, MHV = self._relation(self.block, self.v_prev, self.MC, rows, terms)
        V *= vmask  # the relation's own copy
        parts = [(self.Z, V), (self.HZ, MHV)]  # without M, MC = C and MHV is HV
        if self.preconditioned:
            Ures, HV = self._relation(self.ublock, self.u_prev, self.C, rows, terms)
            Ures *= vmask
            parts = [(self.Z, V), (self.HZ, HV), (self.Zres, Ures), (self.MHZ, MHV)]
            del Ures, HV
        del V, MHV
        mask = xp.astype(self.valid, vmask.dtype)[:, None, :]
        out = []
        while parts:
            carried, new = parts.pop(0)
            block = new if self.Z is None else xp.concat([carried[:, rows, :], new], axis=2)
            del new
            block *= mask
            out.append(block)
        return (*out, None, None)[:4]

    def _jacobian_products(self, terms: tuple[Any, ...]) -> Any:
        """JᵀW: one block application of Jᵀ to the columns not yet seen."""
        xp = array_namespace(self.block[0])
        if self.Z is not None and self.JZ is None:
            self.JZ = self.jac_t(self.Z)
        m, vvalid = terms[0].shape[1], terms[-1]
        V = xp.stack(self.block[:m], axis=2) * xp.astype(vvalid, self.block[0].dtype)[:, None, :]
        JV = self.jac_t(V)
        return JV if self.Z is None else xp.concat([self.JZ, JV], axis=2)

    def _basis(self, *, jacobian: bool = True) -> tuple[Any, ...]:
        """W = [Z, V], HW (from the Lanczos relation), JᵀW (when the strategy needs it and
        ``jacobian``: one block application of Jᵀ to the columns not yet seen) and, with M,
        M⁻¹W and M·HW, of the current cycle, whole, with each sample's invalid columns
        zeroed (``self.valid`` holds the mask)."""
        want_j = jacobian and self.jac_t is not None
        if not self.steps:
            if self.Z is None:
                return None, None, None, None, None
            if want_j and self.JZ is None:
                self.JZ = self.jac_t(self.Z)
            xp = array_namespace(self.Z)
            self.valid = self.zvalid
            mask = xp.astype(self.valid, self.Z.dtype)[:, None, :]
            extra = (self.Zres * mask, self.MHZ * mask) if self.preconditioned else (None, None)
            return self.Z * mask, self.HZ * mask, self.JZ if want_j else None, *extra
        terms = self._terms()
        W, HW, Wres, MHW = self._rows(slice(None), terms)
        return W, HW, self._jacobian_products(terms) if want_j else None, Wres, MHW

    def current_basis(self) -> tuple[Any, Any, Any]:
        """W, HW and JᵀW (see ``_basis``)."""
        return self._basis()[:3]

    def projection(self) -> tuple[Any, Projection]:
        """W and its projected matrices (no operator applications, JᵀW excepted); with a
        preconditioner those of Â = LᵀAL on L⁻¹W (README, "Preconditioned recycling")."""
        W, HW, JW, Wres, MHW = self._basis()
        return W, Projection.from_products(W, HW, JW, Wres=Wres, MHW=MHW)

    def _compress(self, *, final: bool) -> None:
        """Select k vectors of W = [Z, V]: the projected matrices summed over blocks of
        rows, then Z = W·Y (and HZ = HW·Y, JᵀZ = JᵀW·Y to go on; with M also M⁻¹Z and
        M·HZ) block by block."""
        cfg = self.config
        xp = array_namespace(self.block[0])
        terms = self._terms()
        B, n = self.block[0].shape
        # one block when n ≤ ROWS (small problems), else blocks of n / 2D rows (D = dim W,
        # at least ROWS / 4): the blocks alive at a time hold about 1.5 n numbers
        size = n if n <= ROWS else max(ROWS // 4, n // (2 * int(self.valid.shape[-1])))
        chunks = [slice(i, min(i + size, n)) for i in range(0, n, size)]
        JW = None if self.jac_t is None else self._jacobian_products(terms)
        proj = None
        for rows in chunks:
            W, HW, Wres, MHW = self._rows(rows, terms)  # masked
            part = Projection.from_products(W, HW, Wres=Wres, MHW=MHW)
            del W, HW, Wres, MHW
            proj = part if proj is None else proj + part
        coef = select(replace(proj, P=JW), cfg.strategy, cfg.dim, cfg.which)
        shape, like = (B, n, coef.shape[-1]), self.block[0]
        reuse = self.owned and tuple(self.Z.shape) == shape

        def target(old: Any, needed: bool) -> Any:
            if not needed:
                return None
            return old if reuse else xp.empty(shape, dtype=like.dtype, device=device_of(like))

        pre = self.preconditioned
        Z, HZ = target(self.Z, True), target(self.HZ, not final)
        Zres, MHZ = target(self.Zres, pre), target(self.MHZ, pre and not final)
        squares = xp.zeros((B, shape[-1]), dtype=like.dtype, device=device_of(like))
        for rows in chunks:
            W, HW, Wres, MHW = self._rows(rows, terms)  # read before this block is written
            block = W @ coef
            for out, source in ((HZ, HW), (Zres, Wres), (MHZ, MHW)):
                if out is not None:
                    out[:, rows, :] = source @ coef
            Z[:, rows, :] = block
            squares += xp.sum(block * block, axis=-2)
        self.Z, self.HZ, self.owned, self.zvalid = Z, HZ, True, squares > 0
        self.Zres, self.MHZ = Zres, MHZ
        if not final:
            self.JZ = None if JW is None else JW @ coef
            m = len(self.steps)
            self.v_prev, self.beta_prev = self.block[m - 1], self.steps[-1][1]
            self.u_prev = self.ublock[m - 1]
            self.block, self.steps = self.block[m:], []
            self.ublock = self.ublock[m:] if pre else self.block
        self.cycles += 1


class Recycler:
    """Turns carries into recycle spaces for the next operators, per ``RecycleConfig``."""

    def __init__(self, config: RecycleConfig) -> None:
        self.config = config

    def harvester(self, jac_t: Operator | None = None) -> RecycleHarvester | None:
        """A fresh harvester for one solve (None when nothing needs harvesting)."""
        if not self.config.enabled or self.config.strategy in ORACLES:
            return None
        return RecycleHarvester(self.config, jac_t)

    def prepare(self, carry: RecycleCarry | None, H: Operator, jac_t: Operator | None = None,
                *, like: Any = None, M: Operator | None = None) -> RecycleSpace | None:
        """The recycle space for operator ``H`` (k applications for C = HU; outer
        selection: dim W; the oracles: n, on an identity like the right-hand side ``like``).
        A 1-D ``like`` or an (n, D) carry means one system with 1-D operators.  With a
        preconditioner ``M`` the carry is in residual form and the space M-orthonormal
        (2k applications of M more; outer selection and the oracles: 2 dim W)."""
        cfg = self.config
        if not cfg.enabled or (carry is None and cfg.strategy not in ORACLES):
            return None
        if (like is not None and like.ndim == 1) or (carry is not None and carry.basis.ndim == 2):
            promoted = None if carry is None else RecycleCarry(carry.basis[None, ...],
                                                               carry.selected)
            space = self.prepare(promoted, RowOperator(H),
                                 None if jac_t is None else RowOperator(jac_t, check=False),
                                 like=None if like is None else like[None, ...],
                                 M=None if M is None else RowOperator(M))
            return None if space is None else space.sample(0)
        if cfg.strategy in ORACLES:
            if like is None:
                raise ValueError("oracle strategies need like= (a vector of the system)")
            xp = array_namespace(like)
            eye = xp.eye(like.shape[-1], dtype=like.dtype, device=device_of(like))
            return self._select(xp.broadcast_to(eye, (like.shape[0], *eye.shape)), H, jac_t,
                                ORACLES[cfg.strategy], M)
        if carry.selected:
            return RecycleSpace.from_basis(H, carry.basis, rank_tol=cfg.rank_tol, M=M)
        return self._select(carry.basis, H, jac_t, cfg.strategy, M)

    def _select(self, W: Any, H: Operator, jac_t: Operator | None, strategy: str,
                M: Operator | None) -> Any:
        """Select against H from the whole of W (dim W applications of H, and of Jᵀ;
        with M, W is in residual form: MW, M·H(MW) are 2 dim W applications of M)."""
        cfg = self.config
        Wres, W = (None, W) if M is None else (W, M(W))
        HW = H(W)
        MHW = None if M is None else M(HW)
        JW = jac_t(W) if cfg.needs_jacobian else None
        Y = select(Projection.from_products(W, HW, JW, Wres=Wres, MHW=MHW), strategy,
                   cfg.dim, cfg.which)
        MAY, MinvY = (None, None) if M is None else (MHW @ Y, Wres @ Y)
        return RecycleSpace.from_products(W @ Y, HW @ Y, rank_tol=cfg.rank_tol, MAY=MAY,
                                          MinvY=MinvY)

    def carry_after(self, result: Any, space: RecycleSpace | None) -> RecycleCarry | None:
        """The carry after a solve: its harvest, or the unchanged space when the solve
        made no Lanczos step (e.g. converged at the start)."""
        if result.harvest is not None:
            return result.harvest
        if space is not None and self.config.strategy not in ORACLES:
            return RecycleCarry(basis=space.basis, selected=True)
        return None
