"""Composed configs: every group option validates; bad values fail naming the key."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from framework.experiment.config import Config, ConfigError, flatten, validate
from framework.experiment.engine_setup import engine_config
from framework.krylov.recycle import RecycleConfig
from framework.krylov.selection import Strategy
from framework.krylov.stopping import StopConfig, StopKind

GROUP_OPTIONS = {
    "problem": ["mnist_inpainting", "denoise", "quadratic"],
    "backend": ["numpy", "cupy", "array_api_strict"],
    "recycle": ["none", "ritz", "harmonic_ritz", "rgen_left", "rgen_right", "rgen_both"],
    "outer": ["adam", "gd"],
    "stop": ["residual", "hypergradient", "hypergradient_change"],
    "tracking": ["default", "disabled"],
    "baseline": ["none", "shadow"],
    "checkpoint": ["default", "off"],
    "experiment": ["quick", "paper_mnist", "rgen_nsc"],
}


def _compose(*overrides: str):
    with initialize_config_module(config_module="conf", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_default_config_is_valid():
    c = validate(_compose())
    assert isinstance(c, Config)
    assert c.problem.name == "mnist_inpainting" and c.problem.dataset == "embedded_mnist"
    assert c.recycle.strategy == "none" and c.outer.name == "adam"
    assert c.solver.preconditioner == c.solver.lower.preconditioner == "auto"
    assert c.baseline.mode == "shadow" and c.tracking.enabled


@pytest.mark.parametrize(
    "override", [f"{g}={o}" for g, opts in GROUP_OPTIONS.items() for o in opts]
)
def test_every_group_option_composes_and_validates(override):
    c = validate(_compose(override))
    group, option = override.split("=")
    if group == "recycle":
        assert c.recycle.strategy == option
    if group == "problem":
        assert c.problem.name == option


@pytest.mark.parametrize(("preset", "chosen", "steps"), [
    ("paper_mnist_inpainting", "adam", 200), ("paper_bsds_deblur", "adam", 200),
    ("bsds_deblur_learn", "lbfgs", 30)])
def test_a_presets_outer_optimiser_is_a_group_choice_the_command_line_changes(
        preset, chosen, steps):
    # the presets choose their optimiser in their defaults list, not by pinning outer.name,
    # so another one on the command line takes effect (with the presets' step count and lr)
    assert _compose(f"experiment={preset}").outer.name == chosen
    other = "adam" if chosen == "lbfgs" else "lbfgs"
    outer = _compose(f"experiment={preset}", f"outer={other}", "outer.batch_size=null").outer
    assert (outer.name, outer.memory, outer.steps) == (other, 10, steps)


def test_bsds_with_existing_path_validates(tmp_path):
    (tmp_path / "images" / "train").mkdir(parents=True)
    for i in range(4):  # the layout only: the loader reads them later
        (tmp_path / "images" / "train" / f"{i}.jpg").touch()
    c = validate(_compose("problem=bsds_deblur", f"problem.data_path={tmp_path}"))
    assert c.problem.operator == "blur"


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["recycle.dim=-3"], "recycle.dim"),
        (["outer.lr=0"], "outer.lr"),
        (["outer.lr=-1e-3"], "outer.lr"),
        (["outer.steps=0"], "outer.steps"),
        (["outer.lr_decay=0"], "outer.lr_decay"),
        (["outer.lr_decay=1.5"], "outer.lr_decay"),
        (["outer=lbfgs", "outer.batch_size=2"], "outer.batch_size"),  # of 4 samples
        (["outer=lbfgs", "outer.max_backtracks=0"], "outer.max_backtracks"),
        (["outer=lbfgs", "outer.memory=0"], "outer.memory"),
        (["problem=bsds_deblur"], "problem.data_path"),
        (["problem=bsds_deblur", "problem.data_path=/no/such/folder"], "problem.data_path"),
        (["problem.kernel_size=4"], "problem.kernel_size"),
        (["problem.num_samples=40"], "problem.num_samples"),
        (["checkpoint.every=-1"], "checkpoint.every"),
        (["recycle.max_vectors=0"], "recycle.max_vectors"),
        (["solver.check_every=0"], "solver.check_every"),
        (["solver.compact_rows=-1"], "solver.compact_rows"),
        (["problem.crops_per_image=0"], "problem.crops_per_image"),
        (["problem.crops_per_image=2"], "problem.crops_per_image"),  # MNIST: whole digits
        (["stop=hypergradient_change", "stop.window=0"], "stop.window"),
        (["problem.split=test"], "problem.split"),  # embedded MNIST has one split
        (["solver.preconditioner=fft", "stop=hypergradient", "recycle=ritz"],
         "solver.preconditioner"),  # with recycling and NSC
        (["solver.preconditioner=fft", "stop=hypergradient_change"],
         "solver.preconditioner"),  # its estimate needs the unpreconditioned residual
        (["solver.preconditioner=fft", "recycle=none", "problem.regularizer=tv"],
         "solver.preconditioner"),
        (["problem.init_exponent=inf"], "problem.init_exponent"),
        (["problem=quadratic", "problem.coupling=nan"], "problem.coupling"),
        (["problem=quadratic", "problem.normalize=true"], "problem.normalize"),  # no images
        (["problem=quadratic", "problem.zero_mean_filters=true"], "problem.zero_mean_filters"),
        (["problem.mse_floor=1e-3"], "problem.mse_floor"),  # squared_error has no floor
        (["problem.upper_loss=neg_psnr", "problem.mse_floor=-1"], "problem.mse_floor"),
        (["problem.regularizer=tv", "problem.zero_mean_filters=true"],
         "problem.zero_mean_filters"),  # no filters
        (["problem.operator=blur", "problem.blur_sigma=9"], "problem.blur_sigma"),  # 28×28
        (["solver.lower.preconditioner=fft", "solver.lower.name=lbfgs"],
         "solver.lower.preconditioner"),
        (["solver.lower.preconditioner=fft", "problem.regularizer=tv"],
         "solver.lower.preconditioner"),
        (["problem.boundary=symmetric", "problem.kernel_size=59"],
         "problem.boundary"),  # reflects 29 pixels of a 28×28 digit
    ],
)
def test_bad_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=f"^{key}"):
        validate(_compose(*overrides))


@pytest.mark.parametrize(
    ("override", "key"),
    [("recycle.strategy=ritzz", "recycle.strategy"), ("recycle.which=middle", "recycle.which"),
     ("backend.name=jax", "backend.name"), ("stop.kind=galerkin", "stop.kind"),
     ("baseline.mode=all", "baseline.mode"), ("problem.split=val", "problem.split"),
     ("outer.name=sgd", "outer.name"), ("task=fit", "task"), ("recycle.dim=abc", "recycle.dim"),
     ("solver.preconditioner=ilu", "solver.preconditioner"),
     ("problem.boundary=reflect", "problem.boundary")],
)
def test_unknown_option_names_fail_at_composition_naming_the_key(override, key):
    """Choices are enums of the schema: Hydra rejects a bad name while composing."""
    with pytest.raises(ConfigCompositionException) as info:
        _compose(override)
    assert isinstance(info.value.__cause__, ValidationError)
    assert info.value.__cause__.full_key == key


def test_bad_boundary_names_the_valid_choices_in_its_first_line():
    """The line ``hyperkrylov`` prints for a composition error (``app.main``)."""
    with pytest.raises(ConfigCompositionException) as info:
        _compose("problem=denoise", "problem.boundary=reflect")
    first = str(info.value.__cause__).splitlines()[0]
    assert "reflect" in first and "zero" in first and "symmetric" in first


@pytest.mark.parametrize("problem", ["mnist_inpainting", "denoise"])
def test_boundary_reaches_the_fields_of_experts(problem):
    from backends import get_backend
    from problems.factory import build_problems

    numpy = get_backend("numpy")
    default = validate(_compose(f"problem={problem}", "problem.num_samples=1"))
    assert default.problem.boundary == "zero"
    assert build_problems(default.problem, numpy, 0).problems[0].regularizer.boundary == "zero"
    c = validate(_compose(f"problem={problem}", "problem.num_samples=1",
                          "problem.boundary=symmetric"))
    problems = build_problems(c.problem, numpy, 0)
    reg = problems.problems[0].regularizer
    assert reg.boundary == "symmetric" and "boundary='symmetric'" in problems.description
    assert flatten(c)["problem.boundary"] == "symmetric"
    assert problems.problems[0].upper == "squared_error"
    c = validate(_compose(f"problem={problem}", "problem.num_samples=1",
                          "problem.upper_loss=neg_psnr"))
    assert build_problems(c.problem, numpy, 0).problems[0].upper == "neg_psnr"
    c = validate(_compose(f"problem={problem}", "problem.num_samples=1",
                          "problem.upper_loss=neg_psnr", "problem.mse_floor=0.003"))
    assert build_problems(c.problem, numpy, 0).problems[0].mse_floor == 0.003


def test_recycle_and_stop_groups_are_the_library_dataclasses():
    c = validate(_compose("recycle=rgen_right", "recycle.dim=7", "stop=hypergradient",
                          "stop.rtol=1e-4", "recycle.max_vectors=20"))
    assert c.recycle == RecycleConfig(Strategy.rgen_right, 7, max_vectors=20)
    assert c.stop == StopConfig(StopKind.hypergradient, rtol=1e-4)
    settings = engine_config(c)
    assert settings.recycle is c.recycle and settings.stop is c.stop


def test_the_two_preconditioners_map_to_their_solves():
    settings = engine_config(validate(_compose("solver.lower.preconditioner=fft",
                                               "solver.preconditioner=none")))
    assert (settings.lower_preconditioner, settings.preconditioner) == ("fft", "none")
    settings = engine_config(validate(_compose("solver.preconditioner=fft",
                                               "solver.lower.preconditioner=none")))
    assert (settings.lower_preconditioner, settings.preconditioner) == ("none", "fft")
    settings = engine_config(validate(_compose("solver.preconditioner=fft", "recycle=ritz")))
    assert (settings.preconditioner, settings.recycle.strategy) == ("fft", "ritz")


def test_typos_and_wrong_types_fail_at_composition():
    with pytest.raises(ConfigCompositionException, match="dimm"):
        _compose("recycle.dimm=3")
    with pytest.raises(ConfigCompositionException, match="recycle"):
        _compose("recycle=ritzz")
    with pytest.raises(ConfigCompositionException):
        _compose("recycle.dim=abc")


def test_flatten_gives_dotted_string_params():
    flat = flatten(validate(_compose("problem=quadratic")))
    assert flat["problem.name"] == "quadratic"
    assert flat["solver.lower.gtol"] == "1e-06"
    assert flat["recycle.which"] == "null"
    assert flat["evaluate.tv_grid"] == "[-5.0, -4.5, -4.0, -3.5, -3.0, -2.5, -2.0, -1.5, -1.0]"
    assert flat["evaluate.strength_grid"] == "[]"  # a list is one param, not one per entry
    assert all(isinstance(v, str) for v in flat.values())


def test_experiment_preset_overrides_groups():
    c = validate(_compose("experiment=quick"))
    assert c.problem.name == "quadratic" and c.recycle.dim == 4 and c.outer.steps == 5
