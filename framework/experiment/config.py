"""Structured experiment configuration: dataclass schemas, Hydra registration, validation.

The YAML files in ``conf/`` choose one option per group; the dataclasses here are the
schema they are merged into (``config_schema`` is the first entry of ``conf/config.yaml``'s
defaults list), so an unknown key or a value of the wrong type fails at composition.
``validate`` then checks values (names, ranges, paths) and raises ``ConfigError`` naming
the bad key, before any data is loaded or any tracking run is created.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

PROBLEMS = ("mnist_inpainting", "bsds_deblur", "denoise", "quadratic")
DATASETS = ("embedded_mnist", "mnist", "bsds300", "none")
SPLITS = ("train", "test")
OPERATORS = ("identity", "inpainting", "blur", "none")
REGULARIZERS = ("foe", "tv", "none")
EXPERTS = ("l2", "huber", "smooth_l1", "lorentzian")
LEARN = ("filters", "exponents", "both")
FILTER_INITS = ("dct", "gaussian")
BACKENDS = ("numpy", "cupy", "array_api_strict", "torch")
DTYPES = ("float32", "float64")
STRATEGIES = ("none", "ritz", "harmonic_ritz", "rgen_left", "rgen_right", "rgen_both")
WHICH = ("small", "large", "mix")
STOP_RULES = ("residual", "hypergradient")
OPTIMIZERS = ("adam", "gd")
BASELINES = ("none", "shadow")
TASKS = ("train", "record", "resolve", "evaluate")


class ConfigError(ValueError):
    """A configuration value is invalid; the message starts with the dotted key."""


@dataclass
class ProblemConfig:
    """One dataset of bilevel samples (fields not used by a problem are ignored)."""

    name: str = "mnist_inpainting"
    dataset: str = "embedded_mnist"
    data_path: str | None = None
    num_samples: int = 4
    start: int = 0
    split: str = "train"  # BSDS300 image folder: train | test
    crop: int = 64
    operator: str = "inpainting"
    fraction_removed: float = 0.4
    blur_sigma: float = 1.5
    noise_level: float = 0.05
    regularizer: str = "foe"
    kernel_size: int = 5
    num_filters: int | None = None
    filters_init: str = "dct"
    init_exponent: float = -1.0
    expert: str = "lorentzian"
    gamma: float = 0.01
    learn: str = "both"
    epsilon: float = 1e-6
    # quadratic test problem
    n: int = 30
    num_terms: int = 3
    coupling: float = 0.5


@dataclass
class BackendConfig:
    name: str = "numpy"
    dtype: str = "float64"
    device: str | None = None
    # BLAS/OpenMP threads of the run (null: backends.threads.choose_num_threads — one per
    # job on the CPU unless the problem is dense and large; ignored by CuPy)
    num_threads: int | None = None


@dataclass
class LowerSolverConfig:
    gtol: float = 1e-6
    maxiter: int = 500
    memory: int = 10


@dataclass
class SolverConfig:
    rtol: float = 1e-3
    atol: float = 0.0
    maxiter: int = 500
    max_vectors: int | None = None
    check_every: int | None = None
    lower: LowerSolverConfig = field(default_factory=LowerSolverConfig)


@dataclass
class RecycleConfig:
    strategy: str = "ritz"
    dim: int = 10
    which: str | None = None


@dataclass
class StopConfig:
    rule: str = "residual"
    tol: float = 1e-3
    safety: float = 1.0


@dataclass
class OuterConfig:
    name: str = "adam"
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
    mode: str = "none"


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
    split: str | None = None
    tv_grid: list[float] = field(
        default_factory=lambda: [-5.0, -4.5, -4.0, -3.5, -3.0, -2.5, -2.0, -1.5, -1.0]
    )


@dataclass
class Config:
    """The whole composed configuration of one run."""

    problem: ProblemConfig = field(default_factory=ProblemConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    recycle: RecycleConfig = field(default_factory=RecycleConfig)
    stop: StopConfig = field(default_factory=StopConfig)
    outer: OuterConfig = field(default_factory=OuterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sequence: SequenceConfig = field(default_factory=SequenceConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    task: str = "train"
    seed: int = 0
    progress: bool = True


def register_configs() -> None:
    """Register the root schema ``config_schema`` in Hydra's ConfigStore.

    ``conf/config.yaml`` lists it first, so every group option is merged into (and
    type-checked against) the dataclass of its group.
    """
    ConfigStore.instance().store(name="config_schema", node=Config)


register_configs()


# -- validation ------------------------------------------------------------------------
def _choice(key: str, value: Any, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ConfigError(f"{key}: unknown value {value!r}; choose one of {', '.join(options)}")


def _positive(key: str, value: float | int | None, *, allow_zero: bool = False) -> None:
    bad = value is None or not math.isfinite(float(value))
    bad = bad or (value < 0 if allow_zero else value <= 0)
    if bad:
        sign = "non-negative" if allow_zero else "positive"
        raise ConfigError(f"{key}: must be {sign}; got {value!r}")


def _validate_problem(p: ProblemConfig) -> None:
    _choice("problem.name", p.name, PROBLEMS)
    if p.name == "quadratic":
        if p.n < 3:
            raise ConfigError(f"problem.n: must be at least 3; got {p.n!r}")
        _positive("problem.num_terms", p.num_terms)
        _positive("problem.num_samples", p.num_samples)
        return
    _choice("problem.dataset", p.dataset, DATASETS[:-1])
    _choice("problem.operator", p.operator, OPERATORS[:-1])
    _choice("problem.regularizer", p.regularizer, REGULARIZERS[:-1])
    _choice("problem.expert", p.expert, EXPERTS)
    _choice("problem.learn", p.learn, LEARN)
    _choice("problem.filters_init", p.filters_init, FILTER_INITS)
    _positive("problem.num_samples", p.num_samples)
    _positive("problem.start", p.start, allow_zero=True)
    _choice("problem.split", p.split, SPLITS)
    if p.split != "train" and p.dataset != "bsds300":
        raise ConfigError(
            f"problem.split: only bsds300 has a {p.split!r} split; dataset {p.dataset!r} "
            "has one set of images (use problem.start to choose them)"
        )
    _positive("problem.noise_level", p.noise_level, allow_zero=True)
    _positive("problem.gamma", p.gamma)
    _positive("problem.epsilon", p.epsilon, allow_zero=True)
    _positive("problem.blur_sigma", p.blur_sigma)
    if not 0.0 <= p.fraction_removed < 1.0:
        raise ConfigError(
            f"problem.fraction_removed: must be in [0, 1); got {p.fraction_removed!r}"
        )
    if p.kernel_size < 1 or p.kernel_size % 2 == 0:
        raise ConfigError(
            f"problem.kernel_size: must be a positive odd integer; got {p.kernel_size!r}"
        )
    if p.num_filters is not None:
        _positive("problem.num_filters", p.num_filters)
        if p.filters_init == "dct" and p.num_filters > p.kernel_size**2 - 1:
            raise ConfigError(
                f"problem.num_filters: at most kernel_size² − 1 = {p.kernel_size**2 - 1} DCT "
                f"filters exist; got {p.num_filters}"
            )
    if p.dataset == "embedded_mnist":
        if p.start + p.num_samples > 16:
            raise ConfigError(
                "problem.num_samples: the embedded MNIST sample holds 16 digits; "
                f"start + num_samples = {p.start + p.num_samples}"
            )
        return
    if p.dataset == "bsds300":
        _positive("problem.crop", p.crop)
    if not p.data_path:
        raise ConfigError(
            f"problem.data_path: required for dataset {p.dataset!r}; "
            "give problem.data_path=/path/to/the/data"
        )
    path = Path(p.data_path).expanduser()
    if not path.exists():
        raise ConfigError(f"problem.data_path: {str(path)!r} does not exist")


def _validate_task(c: Config) -> None:
    s = c.sequence
    if not s.filename or "/" in s.filename or not s.filename.endswith(".npz"):
        raise ConfigError(
            f"sequence.filename: must be a plain file name ending in .npz; got {s.filename!r}"
        )
    _positive("sequence.reference_rtol", s.reference_rtol)
    if c.task == "record":
        if not s.samples:
            raise ConfigError("sequence.samples: give at least one sample index to record")
        count = c.problem.num_samples
        bad = [i for i in s.samples if not 0 <= i < count]
        if bad or len(set(s.samples)) != len(s.samples):
            raise ConfigError(
                f"sequence.samples: must be distinct indices in [0, {count}) "
                f"(problem.num_samples); got {list(s.samples)!r}"
            )
    if c.task == "resolve":
        if not s.path:
            raise ConfigError(
                "sequence.path: required for task=resolve; give sequence.path=/path/to/"
                "sequence.npz (written by task=record)"
            )
        path = Path(s.path).expanduser()
        if not path.is_file():
            raise ConfigError(f"sequence.path: {str(path)!r} does not exist or is not a file")
    if c.task == "evaluate":
        if not c.evaluate.theta_path:
            raise ConfigError(
                "evaluate.theta_path: required for task=evaluate; give "
                "evaluate.theta_path=/path/to/theta.npz (written by a training run)"
            )
        if not Path(c.evaluate.theta_path).expanduser().is_file():
            raise ConfigError(
                f"evaluate.theta_path: {c.evaluate.theta_path!r} does not exist or is not a file"
            )
        _positive("evaluate.num_samples", c.evaluate.num_samples)
        _positive("evaluate.offset", c.evaluate.offset, allow_zero=True)
        if c.evaluate.split is not None:
            _choice("evaluate.split", c.evaluate.split, SPLITS)
            if c.evaluate.split != "train" and c.problem.dataset != "bsds300":
                raise ConfigError(
                    f"evaluate.split: only bsds300 has a {c.evaluate.split!r} split; "
                    f"dataset {c.problem.dataset!r} takes held-out images after the "
                    "training ones (leave evaluate.split=null)"
                )
        if not c.evaluate.tv_grid:
            raise ConfigError("evaluate.tv_grid: give at least one log10 TV weight")


def validate(cfg: DictConfig | Config) -> Config:
    """Return ``cfg`` as a typed ``Config`` or raise ``ConfigError`` naming the bad key."""
    if isinstance(cfg, DictConfig):
        try:
            merged = OmegaConf.merge(OmegaConf.structured(Config), cfg)
            c = OmegaConf.to_object(merged)
        except Exception as exc:  # omegaconf errors: missing values, wrong types, unknown keys
            key = getattr(exc, "full_key", None)
            prefix = f"{key}: " if key else ""
            raise ConfigError(f"{prefix}{exc}".splitlines()[0]) from exc
        assert isinstance(c, Config)
    else:
        c = cfg
    _choice("task", c.task, TASKS)
    if c.task != "resolve":  # a re-solve takes its problem from the recording
        _validate_problem(c.problem)
    _validate_task(c)
    _choice("backend.name", c.backend.name, BACKENDS)
    _choice("backend.dtype", c.backend.dtype, DTYPES)
    if c.backend.num_threads is not None:
        _positive("backend.num_threads", c.backend.num_threads)
    _positive("solver.rtol", c.solver.rtol, allow_zero=True)
    _positive("solver.atol", c.solver.atol, allow_zero=True)
    if c.solver.rtol == 0 and c.solver.atol == 0 and c.stop.rule == "residual":
        raise ConfigError("solver.rtol: rtol and atol are both zero; the solver would never stop")
    _positive("solver.maxiter", c.solver.maxiter)
    if c.solver.max_vectors is not None:
        _positive("solver.max_vectors", c.solver.max_vectors)
    if c.solver.check_every is not None:
        _positive("solver.check_every", c.solver.check_every)
    _positive("solver.lower.gtol", c.solver.lower.gtol)
    _positive("solver.lower.maxiter", c.solver.lower.maxiter)
    _positive("solver.lower.memory", c.solver.lower.memory)
    _choice("recycle.strategy", c.recycle.strategy, STRATEGIES)
    if c.recycle.which is not None:
        _choice("recycle.which", c.recycle.which, WHICH)
    if c.recycle.dim < 0 or (c.recycle.strategy != "none" and c.recycle.dim == 0):
        raise ConfigError(
            f"recycle.dim: must be positive for strategy {c.recycle.strategy!r}; "
            f"got {c.recycle.dim!r}"
        )
    _choice("stop.rule", c.stop.rule, STOP_RULES)
    _positive("stop.tol", c.stop.tol)
    _positive("stop.safety", c.stop.safety)
    _choice("outer.name", c.outer.name, OPTIMIZERS)
    _positive("outer.lr", c.outer.lr)
    _positive("outer.steps", c.outer.steps)
    if c.outer.batch_size is not None:
        _positive("outer.batch_size", c.outer.batch_size)
    b1, b2 = c.outer.betas
    if not (0 <= b1 < 1 and 0 <= b2 < 1):
        raise ConfigError(f"outer.betas: each must be in [0, 1); got {tuple(c.outer.betas)!r}")
    _positive("outer.eps", c.outer.eps)
    if not 0 < c.outer.shrink < 1:
        raise ConfigError(f"outer.shrink: must be in (0, 1); got {c.outer.shrink!r}")
    if not 0 < c.outer.c1 < 1:
        raise ConfigError(f"outer.c1: must be in (0, 1); got {c.outer.c1!r}")
    _positive("outer.max_backtracks", c.outer.max_backtracks, allow_zero=True)
    if not c.tracking.experiment:
        raise ConfigError("tracking.experiment: must be a non-empty name")
    _choice("baseline.mode", c.baseline.mode, BASELINES)
    _positive("checkpoint.every", c.checkpoint.every, allow_zero=True)
    if not c.checkpoint.filename or "/" in c.checkpoint.filename:
        raise ConfigError(
            f"checkpoint.filename: must be a plain file name; got {c.checkpoint.filename!r}"
        )
    return c


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
