"""Structured experiment configuration: dataclass schemas, Hydra registration, validation.

The YAML files in ``conf/`` choose one option per group; the dataclasses here are the
schema they are merged into (``config_schema`` is the first entry of ``conf/config.yaml``'s
defaults list), so an unknown key, a value of the wrong type or an unknown option name
(every choice is an enum) fails at composition.  The groups ``recycle`` and ``stop`` are
the library's own ``RecycleConfig`` and ``StopConfig``.  ``validate`` then checks ranges
and the rules that tie several keys together and raises ``ConfigError`` naming the bad
key, before any data is loaded or any tracking run is created.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import reduce
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from backends.choice import Choice
from backends.core import BACKEND_NAMES
from framework.bilevel.engine import LowerSolver
from framework.krylov.recycle import RecycleConfig
from framework.krylov.selection import Strategy
from framework.krylov.stopping import StopConfig, StopKind
from framework.optim.outer import Optimizer
from problems.experts import EXPERT_NAMES
from problems.foe import LEARN_OPTIONS

# Option names of the groups (enum members equal their strings; the library's own names
# where a library module owns the idea).
BackendName = Choice("BackendName", BACKEND_NAMES)
Expert = Choice("Expert", EXPERT_NAMES)
Learn = Choice("Learn", LEARN_OPTIONS)
Task = Choice("Task", "train record resolve evaluate")
ProblemName = Choice("ProblemName", "mnist_inpainting bsds_deblur denoise quadratic")
Dataset = Choice("Dataset", "embedded_mnist mnist bsds300 none")
Split = Choice("Split", "train test")
OperatorName = Choice("OperatorName", "identity inpainting blur none")
Regularizer = Choice("Regularizer", "foe tv none")
FilterInit = Choice("FilterInit", "dct gaussian")
DType = Choice("DType", "float32 float64")
Baseline = Choice("Baseline", "none shadow")


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
    operator: OperatorName = OperatorName.inpainting
    fraction_removed: float = 0.4
    blur_sigma: float = 1.5
    noise_level: float = 0.05
    regularizer: Regularizer = Regularizer.foe
    kernel_size: int = 5
    num_filters: int | None = None
    filters_init: FilterInit = FilterInit.dct
    init_exponent: float = -1.0
    expert: Expert = Expert.lorentzian
    gamma: float = 0.01
    learn: Learn = Learn.both
    epsilon: float = 1e-6
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
    name: LowerSolver = LowerSolver.lbfgs
    gtol: float = 1e-6
    maxiter: int = 500
    memory: int = 10


@dataclass
class SolverConfig:
    maxiter: int = 500
    check_every: int | None = None
    lower: LowerSolverConfig = field(default_factory=LowerSolverConfig)


@dataclass
class OuterConfig:
    name: Optimizer = Optimizer.adam
    lr: float = 1e-2
    steps: int = 10
    batch_size: int | None = None
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    shrink: float = 0.5
    c1: float = 1e-4
    max_backtracks: int = 10


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
class SequenceConfig:
    """Recording and re-solving Hessian sequences (``task=record`` / ``task=resolve``).

    ``samples``: the sample indices whose systems ``task=record`` records; ``path``: the
    recording ``task=resolve`` re-solves; ``sample``: which recorded sample it re-solves
    (None = the first); ``reference_rtol``: MINRES tolerance of the reference
    hypergradients (computed once, cached next to the recording as ``<stem>.refs.npz``).
    """

    path: str | None = None
    filename: str = "sequence.npz"
    samples: list[int] = field(default_factory=lambda: [0])
    sample: int | None = None
    reference_rtol: float = 1e-10


@dataclass
class EvaluateConfig:
    """``task=evaluate``: PSNR of a learned θ against the best Huber-TV and the measurement
    on held-out images ``problem.start + problem.num_samples + offset`` onwards, or on
    images ``offset`` onwards of another ``split`` (BSDS300's test folder)."""

    theta_path: str | None = None
    offset: int = 0
    num_samples: int = 4
    # null: held-out images follow the training ones in the training split; "test"
    # (BSDS300): images offset, offset + 1, … of the test split
    split: Split | None = None
    tv_grid: list[float] = field(
        default_factory=lambda: [-5.0, -4.5, -4.0, -3.5, -3.0, -2.5, -2.0, -1.5, -1.0]
    )


@dataclass
class Config:
    """The whole composed configuration of one run."""

    problem: ProblemConfig = field(default_factory=ProblemConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    recycle: RecycleConfig = field(default_factory=lambda: RecycleConfig(Strategy.ritz, 10))
    stop: StopConfig = field(default_factory=lambda: StopConfig(rtol=1e-3))
    outer: OuterConfig = field(default_factory=OuterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sequence: SequenceConfig = field(default_factory=SequenceConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    task: Task = Task.train
    seed: int = 0
    progress: bool = True


# The root schema: conf/config.yaml lists ``config_schema`` first, so every group option is
# merged into (and type-checked against) the dataclass of its group.
ConfigStore.instance().store(name="config_schema", node=Config)


# -- validation ------------------------------------------------------------------------
# Ranges (a None value of an optional key passes); everything else is checked by the
# schema's types and enums or by a rule below.
_POSITIVE = """problem.num_samples problem.num_terms problem.gamma problem.blur_sigma problem.crop
    problem.num_filters backend.num_threads solver.maxiter solver.check_every solver.lower.gtol
    solver.lower.maxiter solver.lower.memory recycle.max_vectors stop.hg_rtol stop.safety
    stop.keep outer.lr outer.steps outer.batch_size outer.eps sequence.reference_rtol
    evaluate.num_samples""".split()
_NON_NEGATIVE = """problem.start problem.noise_level problem.epsilon recycle.dim recycle.rank_tol
    stop.rtol stop.atol outer.max_backtracks checkpoint.every evaluate.offset""".split()


def _fail(key: str, message: str) -> None:
    raise ConfigError(f"{key}: {message}")


def _check_ranges(c: Any) -> None:
    for key in (*_POSITIVE, *_NON_NEGATIVE):
        value, closed = reduce(getattr, key.split("."), c), key in _NON_NEGATIVE
        ok = value is None or (math.isfinite(value) and (value >= 0 if closed else value > 0))
        if not ok:
            _fail(key, f"must be {'non-negative' if closed else 'positive'}; got {value!r}")


def _within(key: str, value: float, low: float, high: float, *, closed_low: bool) -> None:
    if not ((low <= value if closed_low else low < value) and value < high):
        _fail(key, f"must be in {'[' if closed_low else '('}{low}, {high}); got {value!r}")


def _plain_file_name(key: str, name: str, suffix: str = "") -> None:
    if not name or "/" in name or not name.endswith(suffix):
        _fail(key, f"must be a plain file name{f' ending in {suffix}' if suffix else ''}; "
                   f"got {name!r}")


def _existing_file(key: str, path: str | None, task: str, written_by: str) -> None:
    if not path:
        _fail(key, f"required for task={task}; give {key}=/path/to/{written_by}")
    if not Path(path).expanduser().is_file():
        _fail(key, f"{path!r} does not exist or is not a file")


def _check_split(key: str, split: Split | None, dataset: Dataset, hint: str) -> None:
    if split not in (None, Split.train) and dataset != Dataset.bsds300:
        _fail(key, f"only bsds300 has a {split!r} split; dataset {dataset!r} {hint}")


def _validate_problem(p: ProblemConfig) -> None:
    if p.name == ProblemName.quadratic:
        if p.n < 3:
            _fail("problem.n", f"must be at least 3; got {p.n!r}")
        return
    for key in ("dataset", "operator", "regularizer"):
        if getattr(p, key) == "none":
            _fail(f"problem.{key}", f"'none' is only for problem=quadratic ({p.name!r})")
    _check_split("problem.split", p.split, p.dataset,
                 "has one set of images (use problem.start to choose them)")
    _within("problem.fraction_removed", p.fraction_removed, 0.0, 1.0, closed_low=True)
    if p.kernel_size < 1 or p.kernel_size % 2 == 0:
        _fail("problem.kernel_size", f"must be a positive odd integer; got {p.kernel_size!r}")
    if (p.num_filters is not None and p.filters_init == FilterInit.dct
            and p.num_filters > p.kernel_size**2 - 1):
        _fail("problem.num_filters", f"at most kernel_size² − 1 = {p.kernel_size**2 - 1} DCT "
                                     f"filters exist; got {p.num_filters}")
    if p.dataset == Dataset.embedded_mnist:
        if p.start + p.num_samples > 16:
            _fail("problem.num_samples", "the embedded MNIST sample holds 16 digits; "
                                         f"start + num_samples = {p.start + p.num_samples}")
        return
    if not p.data_path:
        _fail("problem.data_path", f"required for dataset {p.dataset!r}; "
                                   "give problem.data_path=/path/to/the/data")
    if not Path(p.data_path).expanduser().exists():
        _fail("problem.data_path", f"{str(Path(p.data_path).expanduser())!r} does not exist")


def _validate_task(c: Config) -> None:
    s = c.sequence
    _plain_file_name("sequence.filename", s.filename, ".npz")
    if c.task == Task.record:
        count = c.problem.num_samples
        if not s.samples or any(not 0 <= i < count for i in s.samples) or (
                len(set(s.samples)) != len(s.samples)):
            _fail("sequence.samples", f"must be one or more distinct indices in [0, {count}) "
                                      f"(problem.num_samples); got {list(s.samples)!r}")
    if c.task == Task.resolve:
        _existing_file("sequence.path", s.path, "resolve", "sequence.npz (written by task=record)")
    if c.task == Task.evaluate:
        _existing_file("evaluate.theta_path", c.evaluate.theta_path, "evaluate",
                       "theta.npz (written by a training run)")
        _check_split("evaluate.split", c.evaluate.split, c.problem.dataset,
                     "takes held-out images after the training ones (leave evaluate.split=null)")
        if not c.evaluate.tv_grid:
            _fail("evaluate.tv_grid", "give at least one log10 TV weight")


def _merged(cfg: DictConfig | Config) -> DictConfig:
    """``cfg`` merged into the schema (types and enum names checked), or ``ConfigError``
    naming the key."""
    try:
        return OmegaConf.merge(OmegaConf.structured(Config), cfg)
    except Exception as exc:  # omegaconf errors: missing values, wrong types, unknown keys
        key = getattr(exc, "full_key", None)
        raise ConfigError(f"{f'{key}: ' if key else ''}{exc}".splitlines()[0]) from exc


def validate(cfg: DictConfig | Config) -> Config:
    """Return ``cfg`` as a typed ``Config`` or raise ``ConfigError`` naming the bad key.

    Ranges and cross-key rules are checked on the merged config before the typed one is
    built, so the library dataclasses (``RecycleConfig``, ``StopConfig``) never see a
    value this function would reject."""
    c: Any = _merged(cfg)
    _check_ranges(c)
    if c.task != Task.resolve:  # a re-solve takes its problem from the recording
        _validate_problem(c.problem)
    _validate_task(c)
    if c.stop.rtol == 0 and c.stop.atol == 0 and c.stop.kind == StopKind.residual:
        _fail("stop.rtol", "rtol and atol are both zero; the solver would never stop")
    if c.recycle.strategy != Strategy.none and c.recycle.dim == 0:
        _fail("recycle.dim", f"must be positive for strategy {c.recycle.strategy!r}; got 0")
    for i, beta in enumerate(c.outer.betas):
        _within(f"outer.betas[{i}]", beta, 0.0, 1.0, closed_low=True)
    _within("outer.shrink", c.outer.shrink, 0.0, 1.0, closed_low=False)
    _within("outer.c1", c.outer.c1, 0.0, 1.0, closed_low=False)
    if not c.tracking.experiment:
        _fail("tracking.experiment", "must be a non-empty name")
    _plain_file_name("checkpoint.filename", c.checkpoint.filename)
    typed = OmegaConf.to_object(c)
    assert isinstance(typed, Config)
    return typed


def flatten(cfg: Any, prefix: str = "") -> dict[str, str]:
    """Flatten a (nested) config to ``{"a.b": "value"}`` with string values (for params)."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    elif not isinstance(cfg, dict):
        cfg = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    out: dict[str, str] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, prefix=f"{name}."))
        else:
            out[name] = "null" if value is None else str(value)
    return out


def to_yaml(cfg: Config) -> str:
    """The typed config as YAML (the artifact ``config.yaml`` of a run)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
