"""The experiment configuration: dataclass schemas, their Hydra registration, ``validate``.

The schema ``config_schema`` comes first in ``conf/config.yaml``'s defaults, so an unknown
key, a wrong type or an unknown option name (every choice is an enum) fails at composition;
``recycle`` and ``stop`` are the library's ``RecycleConfig`` and ``StopConfig``.  ``validate``
checks ranges and the rules that tie keys together (``ConfigError`` naming the key).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import reduce
from pathlib import Path
from typing import Any, cast

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from backends.choice import Choice
from backends.core import BACKEND_NAMES
from framework.bilevel.engine import LowerSolver, Preconditioner
from framework.krylov.recycle import ORACLES, RecycleConfig, Selection
from framework.krylov.selection import Strategy
from framework.krylov.stopping import StopConfig, StopKind
from framework.optim.outer import Optimizer
from problems.base import UPPER_LOSSES
from problems.datasets import MNIST_IMAGES, images_spanned
from problems.experts import EXPERT_NAMES, WIDTHLESS_EXPERTS
from problems.foe import BOUNDARY_OPTIONS, LEARN_OPTIONS

# Option names (enum members equal their strings; the library's where a library owns them).
BackendName = Choice("BackendName", BACKEND_NAMES)
Expert = Choice("Expert", EXPERT_NAMES)
Learn = Choice("Learn", LEARN_OPTIONS)
Boundary = Choice("Boundary", BOUNDARY_OPTIONS)
UpperLoss = Choice("UpperLoss", UPPER_LOSSES)
Task = Choice("Task", "train record resolve evaluate")
ProblemName = Choice("ProblemName", "mnist_inpainting bsds_deblur denoise quadratic")
Dataset = Choice("Dataset", "embedded_mnist mnist bsds300 none")
Split = Choice("Split", "train test")
OperatorName = Choice("OperatorName", "identity inpainting blur none")
Regularizer = Choice("Regularizer", "foe tv tv_foe none")
FilterInit = Choice("FilterInit", "dct gaussian")
DType = Choice("DType", "float32 float64")
Baseline = Choice("Baseline", "none shadow")
ClusterName = Choice("ClusterName", "local dask_local dask_address dask_cuda dask_slurm")


class ConfigError(ValueError):
    """A configuration value is invalid; the message starts with the dotted key."""


@dataclass
class ProblemConfig:
    """One dataset of bilevel samples (fields not used by a problem are ignored)."""

    name: ProblemName = ProblemName.mnist_inpainting
    dataset: Dataset = Dataset.embedded_mnist
    data_path: str | None = None
    num_samples: int = 4
    start: int = 0
    split: Split = Split.train  # BSDS300 image folder
    crop: int = 64
    crops_per_image: int = 1  # BSDS300: samples are crops, this many of each image in turn
    operator: OperatorName = OperatorName.inpainting
    fraction_removed: float = 0.4
    blur_sigma: float = 1.5
    noise_level: float = 0.05
    regularizer: Regularizer = Regularizer.foe
    kernel_size: int = 5
    num_filters: int | None = None
    filters_init: FilterInit = FilterInit.dct
    init_exponent: float = -1.0
    tv_init_exponent: float = -1.5  # regularizer=tv_foe: the TV part's initial log10 weight
    tv_gamma: float | None = None  # regularizer=tv_foe: the TV part's Huber smoothing (null: gamma)
    expert: Expert = Expert.lorentzian
    gamma: float = 0.01
    learn: Learn = Learn.both
    boundary: Boundary = Boundary.zero  # FoE: the padding outside the image
    epsilon: float = 1e-6
    upper_loss: UpperLoss = UpperLoss.squared_error  # imaging problems only
    # neg_psnr: 10 log10(MSE + mse_floor); a floor δ > 0 caps what a crop already at an
    # MSE ≪ δ (a flat one) can add to the mean, so the others steer the training
    mse_floor: float = 0.0
    # imaging problems: pose each sample on the scale of its data (y/s, x_true/s, s = RMS of
    # y); reconstructions and PSNRs are reported on the images' own scale
    normalize: bool = False
    # FoE: each filter is its θ row minus the row's mean, so filters stay blind to the
    # image's mean level however the optimiser moves θ (the chain rule projects Jᵀ)
    zero_mean_filters: bool = False
    # FoE: each filter's expert is Σ_m 10^{p_fm} φ(z; gamma·c_m) over these multipliers c_m,
    # one learned weight per filter and width, all starting at 10^init_exponent ([1]: one
    # width, the classic FoE)
    expert_widths: list[float] = field(default_factory=lambda: [1.0])
    # quadratic test problem
    n: int = 30
    num_terms: int = 3
    coupling: float = 0.5


@dataclass
class BackendConfig:
    name: BackendName = BackendName.numpy
    dtype: DType = DType.float64
    device: str | None = None
    # BLAS/OpenMP threads of the run (null: backends.threads.choose_num_threads — one per
    # job on the CPU unless the problem is dense and large; ignored by CuPy)
    num_threads: int | None = None


@dataclass
class LowerSolverConfig:
    name: LowerSolver = LowerSolver.newton_krylov
    gtol: float = 1e-6
    maxiter: int = 500
    memory: int = 10
    preconditioner: Preconditioner = Preconditioner.auto  # Newton–Krylov's inner solves


@dataclass
class SolverConfig:
    maxiter: int = 500
    check_every: int | None = None
    preconditioner: Preconditioner = Preconditioner.auto
    compact_rows: int = 16  # Krylov solves go on without this many finished rows (0: never)
    lower: LowerSolverConfig = field(default_factory=LowerSolverConfig)


@dataclass
class OuterConfig:
    name: Optimizer = Optimizer.adam
    lr: float = 1e-2
    lr_decay: float = 1.0  # step t's step size: lr · lr_decay^(t−1)
    steps: int = 10
    batch_size: int | None = None
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    shrink: float = 0.5
    c1: float = 1e-4
    max_backtracks: int = 10
    memory: int = 10  # L-BFGS pairs
    # start from this theta.npz (or a training run's checkpoint.npz) instead of the problem's θ₀
    init_theta_path: str | None = None


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str | None = None
    experiment: str = "hyperkrylov"
    run_name: str | None = None
    sweep_id: str | None = None


@dataclass
class BaselineConfig:
    mode: Baseline = Baseline.none


@dataclass
class CheckpointConfig:
    every: int = 5
    filename: str = "checkpoint.npz"


@dataclass
class SlurmConfig:
    """The SLURM job of each worker of ``cluster=dask_slurm`` (``dask_jobqueue``'s
    ``SLURMCluster``): ``cores`` CPUs and ``memory`` (``4GiB``) for ``walltime``
    ([days-]hours:minutes:seconds) in partition ``queue``, charged to ``account`` (null:
    the site's defaults); ``job_extra_directives``: more ``#SBATCH`` options."""

    queue: str | None = None
    account: str | None = None
    cores: int = 1
    memory: str = "4GiB"
    walltime: str = "01:00:00"
    job_extra_directives: list[str] = field(default_factory=list)


@dataclass
class ClusterConfig:
    """Where a run's engine evaluates its samples (``framework.experiment.cluster``):
    ``local`` in this process; the Dask options shard the samples over ``workers``
    processes of this machine (``dask_local``), the workers of the scheduler at
    ``address`` (``dask_address``; the run waits for ``workers`` of them, null: one), one
    worker per visible GPU (``dask_cuda``) or ``workers`` SLURM jobs (``dask_slurm``, each
    as ``slurm`` says)."""

    name: ClusterName = ClusterName.local
    workers: int | None = None
    address: str | None = None
    slurm: SlurmConfig | None = None


@dataclass
class SequenceConfig:
    """``task=record`` records the systems of ``samples`` to ``filename``; ``task=resolve``
    re-solves recorded ``sample`` (None: the first) of ``path`` against references from
    MINRES at ``reference_rtol`` (cached next to the recording as ``<stem>.refs.npz``)."""

    path: str | None = None
    filename: str = "sequence.npz"
    samples: list[int] = field(default_factory=lambda: [0])
    sample: int | None = None
    reference_rtol: float = 1e-10


@dataclass
class EvaluateConfig:
    """``task=evaluate``: held-out images from ``problem.start + problem.num_samples +
    offset`` on in the training split (``split=null``), or from ``offset`` on in another
    split (BSDS300's test folder); ``tv_grid``: the log10 Huber-TV weights tried;
    ``tv_gamma``: the baseline's Huber smoothing (its own, not ``problem.gamma``, which
    belongs to the learned regulariser's expert); ``tv_normalize``: the baseline's
    ``problem.normalize`` (its own: false is the plain Huber-TV, one weight for every
    image; true scales each image's weight by the RMS of its data); ``theta_path``: a
    ``theta.npz`` or a training run's ``checkpoint.npz`` (its θ after that step).
    ``strength_grid`` (empty: θ as learned): each held-out image's strength s, added to
    every log10 weight of θ, picked from these by its predictive risk
    (``framework.bilevel.strength``) with ``strength_probes`` Hutchinson probes and the
    divergence factor of ``strength_factors`` best on the training images that choose the
    TV weight (one factor: no choice)."""

    theta_path: str | None = None
    offset: int = 0
    num_samples: int = 4
    split: Split | None = None
    tv_grid: list[float] = field(
        default_factory=lambda: [-5.0, -4.5, -4.0, -3.5, -3.0, -2.5, -2.0, -1.5, -1.0]
    )
    tv_gamma: float = 0.01
    tv_normalize: bool = False
    strength_grid: list[float] = field(default_factory=list)
    strength_factors: list[float] = field(default_factory=lambda: [1.0])
    strength_probes: int = 6


@dataclass
class Config:
    """The whole composed configuration of one run."""

    problem: ProblemConfig = field(default_factory=ProblemConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    recycle: RecycleConfig = field(default_factory=RecycleConfig)
    stop: StopConfig = field(default_factory=lambda: StopConfig(rtol=1e-3))
    outer: OuterConfig = field(default_factory=OuterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    sequence: SequenceConfig = field(default_factory=SequenceConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    task: Task = Task.train
    seed: int = 0
    progress: bool = True
    resume_from: str | None = None  # an MLflow run id: resume from its checkpoint artifact


ConfigStore.instance().store(name="config_schema", node=Config)


# -- validation: ranges (None passes) and rules across keys --------------------------------
_POSITIVE = """problem.num_samples problem.num_terms problem.gamma problem.tv_gamma
    problem.blur_sigma problem.crop problem.crops_per_image
    problem.num_filters backend.num_threads solver.maxiter solver.check_every solver.lower.gtol
    solver.lower.maxiter solver.lower.memory recycle.max_vectors stop.hg_rtol stop.safety
    stop.keep stop.window cluster.workers outer.lr outer.steps outer.batch_size outer.eps
    outer.memory
    sequence.reference_rtol evaluate.num_samples evaluate.tv_gamma
    evaluate.strength_probes""".split()
_NON_NEGATIVE = """problem.start problem.noise_level problem.epsilon problem.mse_floor
    solver.compact_rows recycle.dim recycle.rank_tol stop.rtol stop.atol outer.max_backtracks
    checkpoint.every evaluate.offset""".split()


def _check(ok: Any, key: str, message: str) -> None:
    """Raise ``ConfigError("<key>: <message>")`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _within(key: str, value: float, low: float, high: float, *, closed_low: bool) -> None:
    ok = (low <= value if closed_low else low < value) and value < high
    _check(ok, key, f"must be in {'[' if closed_low else '('}{low}, {high}); got {value!r}")


def _plain_file_name(key: str, name: str, suffix: str = "") -> None:
    _check(name and "/" not in name and name.endswith(suffix), key,
           f"must be a plain file name{f' ending in {suffix}' if suffix else ''}; got {name!r}")


def _existing_file(key: str, path: str | None, task: str, written_by: str) -> None:
    _check(path, key, f"required for task={task}; give {key}=/path/to/{written_by}")
    _check(Path(path or "").expanduser().is_file(), key,
           f"{path!r} does not exist or is not a file")


def _check_split(key: str, split: Split | None, dataset: Dataset, hint: str) -> None:
    _check(split in (None, Split.train) or dataset == Dataset.bsds300, key,
           f"only bsds300 has a '{split}' split; dataset '{dataset}' {hint}")


def _validate_problem(p: ProblemConfig) -> None:
    for key in ("init_exponent", "tv_init_exponent", "coupling"):  # finite: θ0, the problem
        _check(math.isfinite(getattr(p, key)), f"problem.{key}",
               f"must be a finite number; got {getattr(p, key)!r}")
    if p.name == ProblemName.quadratic:
        _check(p.n >= 3, "problem.n", f"must be at least 3; got {p.n!r}")
        for key in ("normalize", "zero_mean_filters", "mse_floor"):
            _check(not getattr(p, key), f"problem.{key}",
                   "is for imaging problems; problem=quadratic has no images (set it false)")
        return
    _check(p.mse_floor == 0 or p.upper_loss == UpperLoss.neg_psnr, "problem.mse_floor",
           f"floors the MSE of problem.upper_loss=neg_psnr; upper_loss={p.upper_loss} has no "
           "MSE to floor (set problem.upper_loss=neg_psnr or problem.mse_floor=0)")
    _check(not p.zero_mean_filters or p.regularizer in (Regularizer.foe, Regularizer.tv_foe),
           "problem.zero_mean_filters",
           f"constrains Fields-of-Experts filters; regularizer={p.regularizer} has none "
           "(set it false)")
    widths = list(p.expert_widths)
    _check(widths and all(math.isfinite(c) and c > 0 for c in widths)
           and len(set(widths)) == len(widths), "problem.expert_widths",
           f"must be distinct positive multipliers of problem.gamma; got {widths!r}")
    _check(widths == [1.0] or p.regularizer in (Regularizer.foe, Regularizer.tv_foe),
           "problem.expert_widths", f"mixes Fields-of-Experts widths; regularizer="
           f"{p.regularizer} has no experts (leave it [1.0])")
    _check(len(widths) == 1 or p.expert not in WIDTHLESS_EXPERTS, "problem.expert_widths",
           f"expert {p.expert} has no width, so its widths would all be the same expert; "
           "use problem.expert=student_t (or huber, smooth_l1)")
    for key in ("dataset", "operator", "regularizer"):
        _check(getattr(p, key) != "none", f"problem.{key}",
               f"'none' is only for problem=quadratic ({p.name})")
    _check_split("problem.split", p.split, p.dataset,
                 "has one set of images (use problem.start to choose them)")
    _check(p.crops_per_image == 1 or p.dataset == Dataset.bsds300, "problem.crops_per_image",
           f"crops BSDS300 images; dataset '{p.dataset}' has whole images (set it to 1)")
    _within("problem.fraction_removed", p.fraction_removed, 0.0, 1.0, closed_low=True)
    _check(p.kernel_size >= 1 and p.kernel_size % 2 == 1, "problem.kernel_size",
           f"must be a positive odd integer; got {p.kernel_size!r}")
    most = p.kernel_size**2 - 1
    _check(p.num_filters is None or p.filters_init != FilterInit.dct or p.num_filters <= most,
           "problem.num_filters", f"at most kernel_size² − 1 = {most} DCT filters exist; "
           f"got {p.num_filters}")
    side = 28 if p.dataset != Dataset.bsds300 else p.crop  # MNIST digits are 28×28
    widest = 0.3 * (side - 1)  # the blur kernel's radius σ/0.3 + 1 within the image side
    _check(p.operator != OperatorName.blur or p.blur_sigma <= widest, "problem.blur_sigma",
           f"at most {widest:.3g} for {side}×{side} images (the blur's radius σ/0.3 + 1 "
           f"must not exceed the image side); got {p.blur_sigma!r}")
    _check(p.boundary != Boundary.symmetric or p.kernel_size // 2 <= side, "problem.boundary",
           f"symmetric reflects kernel_size // 2 = {p.kernel_size // 2} pixels, more than the "
           f"{side}×{side} images hold; use zero or a smaller kernel_size")
    if p.dataset == Dataset.embedded_mnist:
        _check(p.start + p.num_samples <= 16, "problem.num_samples", "the embedded MNIST "
               f"sample holds 16 digits; start + num_samples = {p.start + p.num_samples}")
        return
    _check(p.data_path, "problem.data_path", f"required for dataset {p.dataset}; "
           "give problem.data_path=/path/to/the/data")
    path = Path(p.data_path or "").expanduser()
    _check(path.exists(), "problem.data_path", f"{str(path)!r} does not exist")
    if p.dataset == Dataset.bsds300:  # the layout the loader reads, before any work
        folder = path / "images" / str(p.split)
        needed = images_spanned(p.start + p.num_samples, p.crops_per_image)
        found = len(list(folder.glob("*.jpg"))) if folder.is_dir() else 0
        _check(found >= needed, "problem.data_path", f"{str(folder)!r} holds {found} .jpg "
               f"images and the run needs {needed}; " + (
                   "lower problem.start + problem.num_samples (or raise "
                   "problem.crops_per_image)" if found else
                   "give the BSDS300 folder (the one with images/train and images/test)"))
    else:
        images = path / MNIST_IMAGES if path.is_dir() else path
        _check(images.is_file(), "problem.data_path", f"{str(images)!r} not found; give the "
               f"MNIST folder (with {MNIST_IMAGES}) or that file")


def _validate_task(c: Config) -> None:
    s, count = c.sequence, c.problem.num_samples
    _plain_file_name("sequence.filename", s.filename, ".npz")
    if c.task == Task.record:
        distinct = len(set(s.samples)) == len(s.samples)
        _check(s.samples and distinct and all(0 <= i < count for i in s.samples),
               "sequence.samples", f"must be one or more distinct indices in [0, {count}) "
               f"(problem.num_samples); got {list(s.samples)!r}")
    if c.task == Task.resolve:
        _existing_file("sequence.path", s.path, "resolve", "sequence.npz (written by task=record)")
    if c.outer.init_theta_path is not None:
        _check(c.task in (Task.train, Task.record), "outer.init_theta_path",
               f"starts a training run; task={c.task} does not train (remove the key)")
        _existing_file("outer.init_theta_path", c.outer.init_theta_path, c.task,
                       "theta.npz (written by a training run)")
    if c.task == Task.evaluate:
        _existing_file("evaluate.theta_path", c.evaluate.theta_path, "evaluate",
                       "theta.npz (written by a training run)")
        _check_split("evaluate.split", c.evaluate.split, c.problem.dataset,
                     "takes held-out images after the training ones (leave evaluate.split=null)")
        _check(c.evaluate.tv_grid, "evaluate.tv_grid", "give at least one log10 TV weight")
        _validate_strength(c)


def _validate_strength(c: Config) -> None:
    e = c.evaluate
    if not e.strength_grid:
        return
    _check(all(math.isfinite(s) for s in e.strength_grid), "evaluate.strength_grid",
           f"must be finite log10 shifts, e.g. [-0.2,-0.1,0,0.1,0.2]; got {list(e.strength_grid)}")
    _check(e.strength_factors and all(math.isfinite(f) and f > 0 for f in e.strength_factors),
           "evaluate.strength_factors", "must be one or more positive numbers, e.g. [1.0,1.2]; "
           f"got {list(e.strength_factors)}")
    _check(c.problem.operator in ("blur", "identity"), "evaluate.strength_grid",
           "the predictive risk needs noisy data in every pixel (problem.operator blur or "
           f"identity); got {c.problem.operator} (leave evaluate.strength_grid empty)")


def _validate_cluster(c: Config) -> None:
    if c.cluster.name == ClusterName.local:
        return
    _check(c.task == Task.train, "cluster.name", f"{c.cluster.name} runs task=train only; "
           f"use cluster=local for task={c.task}")
    _check(c.cluster.name != ClusterName.dask_address or c.cluster.address, "cluster.address",
           "required for dask_address; give cluster.address=tcp://<scheduler host>:8786")
    _check(c.cluster.name != ClusterName.dask_cuda or c.backend.name == "cupy", "backend.name",
           f"cluster=dask_cuda runs the CuPy backend; add backend=cupy (got {c.backend.name})")
    if c.cluster.name == ClusterName.dask_slurm:
        _validate_slurm(c.cluster)


def _validate_slurm(c: ClusterConfig) -> None:
    s = c.slurm
    _check(s is not None and c.workers, "cluster.name", "dask_slurm needs its job options "
           "and a number of workers; choose it as cluster=dask_slurm cluster.workers=<jobs>")
    _check(s.cores > 0, "cluster.slurm.cores", f"must be positive; got {s.cores}")
    from dask.utils import parse_bytes  # Dask is imported only where a run needs it

    try:
        parse_bytes(s.memory)
    except ValueError:
        _check(False, "cluster.slurm.memory", f"{s.memory!r} is not an amount of memory; "
               "give e.g. 4GiB or 500MB")
    _check(re.fullmatch(r"(\d+-)?\d+(:\d\d){0,2}", s.walltime), "cluster.slurm.walltime",
           f"{s.walltime!r} is not a SLURM time limit; give hours:minutes:seconds "
           "(01:30:00) or days-hours:minutes:seconds (2-00:00:00)")


def validate(cfg: DictConfig | Config) -> Config:
    """Return ``cfg`` as a typed ``Config`` or raise ``ConfigError`` naming the bad key.
    The checks run before the typed config is built, so the library dataclasses
    (``RecycleConfig``, ``StopConfig``) never see a value this function would reject."""
    try:
        c: Any = OmegaConf.merge(OmegaConf.structured(Config), cfg)
    except Exception as exc:  # omegaconf errors: missing values, wrong types, unknown keys
        key = getattr(exc, "full_key", None)
        raise ConfigError(f"{f'{key}: ' if key else ''}{exc}".splitlines()[0]) from exc
    for key in (*_POSITIVE, *_NON_NEGATIVE):
        value, closed = reduce(getattr, key.split("."), c), key in _NON_NEGATIVE
        ok = value is None or (math.isfinite(value) and (value >= 0 if closed else value > 0))
        _check(ok, key, f"must be {'non-negative' if closed else 'positive'}; got {value!r}")
    if c.task != Task.resolve:  # a re-solve takes its problem from the recording
        _validate_problem(c.problem)
    _validate_task(c)
    _check(c.stop.rtol > 0 or c.stop.atol > 0 or c.stop.kind != StopKind.residual, "stop.rtol",
           "rtol and atol are both zero; the solver would never stop")
    _check(c.recycle.strategy == Strategy.none or c.recycle.dim > 0, "recycle.dim",
           f"must be positive for strategy {c.recycle.strategy}; got 0")
    _check(not c.recycle.adaptive or c.recycle.strategy == Strategy.none
           or (c.recycle.strategy not in ORACLES and c.recycle.selection == Selection.inner),
           "recycle.adaptive", "needs a recycle strategy with inner selection (ritz, "
           f"harmonic_ritz, rgen_*); got {c.recycle.strategy}, {c.recycle.selection}; or "
           "add recycle.adaptive=false")
    if c.solver.preconditioner == Preconditioner.fft:
        _check(c.stop.kind == StopKind.residual or (c.stop.kind == StopKind.hypergradient
                                                    and c.recycle.strategy == Strategy.none),
               "solver.preconditioner",
               f"fft is not combined with stop={c.stop.kind} yet (its estimates need the "
               "unpreconditioned residual); use stop=residual")
        _check(c.task != Task.resolve, "solver.preconditioner",
               "task=resolve re-solves a recording without a preconditioner; use none")
        _check(c.problem.regularizer == Regularizer.foe, "solver.preconditioner",
               "fft is built for the FoE regulariser; use none")
    if c.solver.lower.preconditioner == Preconditioner.fft:
        _check(c.solver.lower.name == LowerSolver.newton_krylov, "solver.lower.preconditioner",
               "preconditions Newton–Krylov's inner solves; add solver.lower.name=newton_krylov")
        _check(c.problem.regularizer == Regularizer.foe, "solver.lower.preconditioner",
               "fft is built for the FoE regulariser; use none")
    for i, beta in enumerate(c.outer.betas):
        _within(f"outer.betas[{i}]", beta, 0.0, 1.0, closed_low=True)
    _within("outer.shrink", c.outer.shrink, 0.0, 1.0, closed_low=False)
    _check(0 < c.outer.lr_decay <= 1, "outer.lr_decay",
           f"must be in (0, 1]; got {c.outer.lr_decay!r}")
    _within("outer.c1", c.outer.c1, 0.0, 1.0, closed_low=False)
    if c.outer.name == Optimizer.lbfgs:  # its curvature pairs need one deterministic loss
        batch = c.outer.batch_size
        _check(batch is None or batch >= c.problem.num_samples, "outer.batch_size",
               f"outer=lbfgs needs the full batch (null or ≥ problem.num_samples = "
               f"{c.problem.num_samples}); got {batch!r} — use outer=adam for mini-batches")
        _check(c.outer.max_backtracks >= 1, "outer.max_backtracks",
               "outer=lbfgs needs a line search: at least 1")
    _validate_cluster(c)
    _check(c.tracking.experiment, "tracking.experiment", "must be a non-empty name")
    _check(not c.resume_from or (c.tracking.enabled and c.task in (Task.train, Task.record)),
           "resume_from", "resumes task=train or record from an MLflow run's checkpoint; "
           "it needs tracking enabled")
    _plain_file_name("checkpoint.filename", c.checkpoint.filename)
    return cast(Config, OmegaConf.to_object(c))


def flatten(cfg: Any, prefix: str = "") -> dict[str, str]:
    """A typed config (or a nested dict) as ``{"a.b": "value"}``, string values, None as
    "null" (MLflow params)."""
    if not isinstance(cfg, dict):
        cfg = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    out: dict[str, str] = {}
    for key, value in cfg.items():
        if isinstance(value, dict):
            out.update(flatten(value, prefix=f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = "null" if value is None else str(value)
    return out


def to_yaml(cfg: Config) -> str:
    """The typed config as YAML (the artifact ``config.yaml`` of a run)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
