"""The paper's protocol end to end: record a training run, re-solve the recorded sequence
per strategy (tracked), report from the tracking store, evaluate a learned θ."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from mlflow.tracking import MlflowClient

from backends import get_backend
from framework.bilevel.recording import RecordedSequence
from framework.experiment import checkpoint, tracking
from framework.experiment.compare import compare_paper, main
from framework.experiment.config import ConfigError, flatten, validate
from framework.experiment.engine_setup import engine_config
from framework.experiment.paper import format_paper_table
from framework.experiment.resolve import load_sequence, problem_from_recording, refs_path
from framework.experiment.runner import run
from framework.krylov.sequence import solve_sequence
from framework.krylov.stopping import StopConfig
from problems.factory import build_problems

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy")

QUADRATIC = ["problem=quadratic", "problem.n=20", "problem.num_samples=2", "outer.lr=0.1",
             "outer.steps=5", "outer.batch_size=1", "baseline=none", "progress=false"]
METHODS = ("none", "ritz_s", "harmonic_ritz", "rgen_l_r", "rgen_l_l", "rgen_l_r_nsc")


def _compose(*overrides: str):
    with initialize_config_module(config_module="conf", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture
def recorded(tmp_path, uri):
    """A 5-step recording of both quadratic samples (mini-batches of 1, so each sample is
    sometimes solved by the recorder itself)."""
    cfg = _compose(*QUADRATIC, "task=record", "sequence.samples=[1,0]", "recycle.dim=3")
    summary = run(cfg, output_dir=tmp_path / "record")
    return summary


def _resolve(tmp_path, path, method, *extra):
    cfg = _compose(*QUADRATIC, "task=resolve", f"sequence.path={path}", f"method={method}",
                   "recycle.dim=4", "tracking.sweep_id=paper-test", *extra)
    return cfg, run(cfg, output_dir=tmp_path / f"resolve-{method}")


def test_record_resolve_report(tmp_path, uri, recorded):
    path = recorded.sequence_path
    assert path == tmp_path / "record" / "sequence.npz" and path.is_file()
    artifacts = [p.name for p in (tmp_path / "artifacts").rglob("sequence.npz")]
    assert artifacts == ["sequence.npz"]  # also logged to MLflow
    recording = RecordedSequence.load(path)
    assert recording.steps == 5 and recording.sample_indices == (1, 0)
    assert recording.xs.shape == (5, 2, 20)

    results = {}
    for method in METHODS:
        cfg, summary = _resolve(tmp_path, path, method)
        results[method] = (validate(cfg), summary)
    assert refs_path(path).is_file()
    assert not results["none"][1].references_cached  # computed once ...
    assert all(s.references_cached for m, (_, s) in results.items() if m != "none")  # reused

    # the exported .npz re-solves with solve_sequence alone: same counts as the tracked runs
    be = get_backend("numpy")
    problem = problem_from_recording(recording, 1, be)
    systems = recording.systems(problem, be, sample=1, references=True)
    records = {r.tags["hyperkrylov.label"]: r for r in tracking.read_runs(
        uri, "hyperkrylov", sweep_id="paper-test")}
    assert set(records) == {"none", "Ritz-S", "HRitz-S", "RGen-L(R)", "RGen-L(L)",
                            "RGen-L(R)+NSC"}
    for c, summary in results.values():
        ec = engine_config(c)
        direct = solve_sequence(systems, recycle=ec.recycle, stop=ec.stop,
                                maxiter=ec.krylov_maxiter)
        logged = records[summary.label]
        assert logged.tags["hyperkrylov.strategy"] == c.recycle.strategy
        assert logged.tags["hyperkrylov.stop"] == c.stop.kind
        for key in ("iterations", "hvp", "hvp_passes", "jac_t", "applications", "passes"):
            assert [v for _, v in logged.history[key]] == [
                float(getattr(r, key)) for r in direct.records], (summary.label, key)
        np.testing.assert_allclose([v for _, v in logged.history["hg_error"]],
                                   [r.hg_error for r in direct.records], rtol=1e-6, atol=1e-14)
        assert logged.metrics["total_iterations"] == direct.iterations
        losses = [v for _, v in logged.history["upper_loss"]]
        assert losses == pytest.approx([float(problem.upper_loss(be.asarray(x)))
                                        for x in recording.xs[:, 0]])

    rows, figures = compare_paper("hyperkrylov", sweep="paper-test", folder=tmp_path / "rep")
    assert rows[0].label == "none" and len(rows) == len(METHODS)
    for row in rows:
        m = records[row.label].metrics
        assert row.iterations == m["total_iterations"]
        assert row.applications == m["total_hvp"] + m["total_jac_t"] == m["total_applications"]
        assert row.passes == m["total_passes"] and row.mean_hg_error == m["mean_hg_error"]
        assert row.max_hg_error == m["max_hg_error"]
        none = records["none"].metrics["total_iterations"]
        assert row.iteration_savings == pytest.approx(100 * (1 - row.iterations / none))
    assert [p.name for p in figures] == ["paper_strategies.png"]
    assert all(p.stat().st_size > 1000 for p in figures)
    assert "RGen-L(R)+NSC" in format_paper_table(rows)

    # a dimension sweep adds the iterations-vs-k figure; the CLI prints the table
    for dim in (1, 2):
        _resolve(tmp_path, path, "ritz_s", f"recycle.dim={dim}")
    out = tmp_path / "cli"
    assert main(["--paper", "--sweep", "paper-test", "--outdir", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"paper_strategies.png", "paper_dimensions.png"}


def test_resolve_other_sample_and_bad_sample(tmp_path, uri, recorded):
    path = recorded.sequence_path
    _, summary = _resolve(tmp_path, path, "ritz_s", "sequence.sample=0")
    assert summary.sample == 0 and len(summary.result.records) == 5
    with pytest.raises(ConfigError, match=r"^sequence\.sample"):
        _resolve(tmp_path, path, "ritz_s", "sequence.sample=7")


def test_bad_sequence_path_fails_fast(tmp_path, no_store_uri):
    with pytest.raises(ConfigError, match=r"^sequence\.path: required"):
        run(_compose(*QUADRATIC, "task=resolve"), output_dir=tmp_path / "a")
    with pytest.raises(ConfigError, match=r"^sequence\.path: .* does not exist"):
        run(_compose(*QUADRATIC, "task=resolve", f"sequence.path={tmp_path}/missing.npz"),
            output_dir=tmp_path / "b")
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip file")
    with pytest.raises(ConfigError, match=r"^sequence\.path: .* not a readable recording"):
        load_sequence(corrupt)
    with pytest.raises(ConfigError, match=r"^sequence\.path"):
        run(_compose(*QUADRATIC, "task=resolve", f"sequence.path={corrupt}"),
            output_dir=tmp_path / "c")
    assert not (tmp_path / "mlflow.db").exists()  # no tracking run was created
    with pytest.raises(ConfigError, match=r"^sequence\.samples"):
        validate(_compose(*QUADRATIC, "task=record", "sequence.samples=[5]"))
    with pytest.raises(ConfigCompositionException) as info:  # not a Task: fails composing
        _compose(*QUADRATIC, "task=fly")
    assert info.value.__cause__.full_key == "task"


def test_console_resolve_with_missing_path_names_the_key(tmp_path):
    script = Path(sys.executable).parent / "hyperkrylov"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "framework.experiment.app"]
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db")
    result = subprocess.run(
        [*cmd, "task=resolve", f"sequence.path={tmp_path}/nope.npz",
         f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "sequence.path" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_mnist_small_preset_record_resolve_evaluate(tmp_path, uri):
    small = ["experiment=paper_mnist_inpainting_small", "problem.num_samples=2",
             "problem.num_filters=4", "outer.steps=3", "recycle.dim=5", "progress=false"]
    rec = run(_compose(*small, "task=record"), output_dir=tmp_path / "rec")
    recording = load_sequence(rec.sequence_path)
    assert recording.config()["problem"]["fraction_removed"] == 0.7
    assert recording.xs.shape == (3, 1, 784)
    summary = run(_compose(*small, "task=resolve", f"sequence.path={rec.sequence_path}",
                           "method=rgen_l_r"), output_dir=tmp_path / "res")
    assert summary.label == "RGen-L(R)" and all(
        math.isfinite(r.hg_error) and r.hg_error < 0.1 for r in summary.result.records)
    direct = solve_sequence(
        recording.systems(problem_from_recording(recording, 0, get_backend("numpy")),
                          get_backend("numpy"), references=True),
        recycle=engine_config(validate(_compose(*small, "method=rgen_l_r"))).recycle,
        stop=StopConfig(rtol=1e-3),
    )
    assert [r.iterations for r in direct.records] == [r.iterations for r in
                                                       summary.result.records]
    ev = run(_compose(*small, "task=evaluate", f"evaluate.theta_path={rec.theta_path}",
                      "evaluate.num_samples=1", "evaluate.tv_grid=[-2,-1]"),
             output_dir=tmp_path / "eval")
    (row,) = ev.rows
    assert row.image == 2
    assert all(math.isfinite(v) for v in (row.psnr_measurement, row.psnr_learned, row.psnr_tv))
    assert row.psnr_tv_oracle >= row.psnr_tv - 1e-9
    assert (tmp_path / "eval" / "psnr.txt").is_file()
    # the run's checkpoint serves as its θ file: the same θ, the same figures to the bit
    from_checkpoint = run(_compose(*small, "task=evaluate",
                                   f"evaluate.theta_path={rec.checkpoint_path}",
                                   "evaluate.num_samples=1", "evaluate.tv_grid=[-2,-1]"),
                          output_dir=tmp_path / "eval-checkpoint")
    assert from_checkpoint.rows == ev.rows
    kept = np.load(tmp_path / "eval-checkpoint" / "evaluated_theta.npz")["theta"]
    np.testing.assert_array_equal(kept, checkpoint.load(rec.checkpoint_path)["theta"])
    logged = [a.path for a in MlflowClient(uri).list_artifacts(from_checkpoint.run_id)]
    assert "evaluated_theta.npz" in logged
    with pytest.raises(ConfigError, match=r"^evaluate\.num_samples"):
        run(_compose(*small, "task=evaluate", f"evaluate.theta_path={rec.theta_path}",
                     "evaluate.num_samples=20"), output_dir=tmp_path / "eval2")
    with pytest.raises(ConfigError, match=r"^evaluate\.split"):  # MNIST has one split
        run(_compose(*small, "task=evaluate", f"evaluate.theta_path={rec.theta_path}",
                     "evaluate.split=test"), output_dir=tmp_path / "eval3")


def _bsds_folder(root, count):
    pil = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(3)
    for split in ("train", "test"):
        folder = root / "images" / split
        folder.mkdir(parents=True)
        for i in range(count):
            rgb = rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
            pil.fromarray(rgb).save(folder / f"{i:03d}.jpg", quality=95)
    return root


def test_bsds_held_out_images_come_from_the_test_split(tmp_path, uri):
    data = _bsds_folder(tmp_path / "bsds", 3)
    base = ["experiment=paper_bsds_deblur_small", f"problem.data_path={data}",
            "problem.crop=12", "problem.num_samples=2", "problem.num_filters=4",
            "problem.kernel_size=3", "outer.steps=2", "recycle.dim=3", "progress=false"]
    trained = run(_compose(*base), output_dir=tmp_path / "train")
    ev = run(_compose(*base, "task=evaluate", f"evaluate.theta_path={trained.theta_path}",
                      "evaluate.split=test", "evaluate.offset=1", "evaluate.num_samples=2",
                      "evaluate.tv_grid=[-2,-1]"), output_dir=tmp_path / "eval")
    assert [r.image for r in ev.rows] == [1, 2]  # test images 1 and 2
    assert all(math.isfinite(r.psnr_learned) for r in ev.rows)
    # the Huber-TV baseline has its own smoothing, evaluate.tv_gamma, not the expert's
    # problem.gamma (which the Lorentzian expert ignores: the learned PSNRs stay too)
    held_out = [*base, "task=evaluate", f"evaluate.theta_path={trained.theta_path}",
                "evaluate.split=test", "evaluate.offset=1", "evaluate.num_samples=2",
                "evaluate.tv_grid=[-2,-1]", "tracking=disabled"]
    wider = run(_compose(*held_out, "problem.gamma=0.05"), output_dir=tmp_path / "eval_g")
    own = run(_compose(*held_out, "evaluate.tv_gamma=0.05"), output_dir=tmp_path / "eval_t")
    for a, b, c in zip(ev.rows, wider.rows, own.rows, strict=True):
        assert (b.psnr_learned, b.psnr_tv, b.psnr_tv_oracle) == (
            a.psnr_learned, a.psnr_tv, a.psnr_tv_oracle)
        assert c.psnr_learned == a.psnr_learned and c.psnr_tv_oracle != a.psnr_tv_oracle
    # problem.normalize poses the learned θ's images on their data's scale but reports
    # PSNRs on the images' own (the data's PSNR is unchanged); the baseline stays the plain
    # Huber-TV unless evaluate.tv_normalize asks for its normalised form
    normal = run(_compose(*held_out, "problem.normalize=true"), output_dir=tmp_path / "eval_n")
    both = run(_compose(*held_out, "problem.normalize=true", "evaluate.tv_normalize=true"),
               output_dir=tmp_path / "eval_nt")
    for a, n, m in zip(ev.rows, normal.rows, both.rows, strict=True):
        assert n.psnr_measurement == pytest.approx(a.psnr_measurement, abs=1e-10)
        assert (n.psnr_tv, n.psnr_tv_oracle) == (a.psnr_tv, a.psnr_tv_oracle)
        assert abs(n.psnr_learned - a.psnr_learned) > 1e-6
        assert m.psnr_learned == n.psnr_learned and m.psnr_tv_oracle != a.psnr_tv_oracle
    # one reconstruction figure (truth, data, Huber-TV, learned) per image, a PNG in MLflow
    client = MlflowClient(uri)
    figures = [a.path for a in client.list_artifacts(ev.run_id, "reconstructions")]
    assert figures == ["reconstructions/image_001.png", "reconstructions/image_002.png"]
    assert all((tmp_path / "eval" / name).is_file() for name in figures)  # and in the folder
    png = Path(client.download_artifacts(ev.run_id, figures[0], str(tmp_path)))
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    # the held-out problems are built from the test folder, with their own seeds
    be = get_backend("numpy")
    cfg = validate(_compose(*base)).problem
    test_cfg = dataclasses.replace(cfg, split="test", start=1, num_samples=2)
    train_cfg = dataclasses.replace(cfg, start=1, num_samples=2)
    test_y = [be.to_numpy(p.x_true) for p in build_problems(test_cfg, be, 0).problems]
    train_y = [be.to_numpy(p.x_true) for p in build_problems(train_cfg, be, 0).problems]
    assert not np.array_equal(test_y[0], train_y[0])


def test_per_image_strength_in_evaluate(tmp_path, uri):
    """``evaluate.strength_grid``: each held-out image's PSNR is that of θ with every log10
    weight (the FoE's exponent column) moved by its picked s, as a plain evaluation of that
    shifted θ scores it; its as-trained PSNR is the plain evaluation's; the factor chosen on
    the training images is one of those given and is logged; bad keys are refused."""
    data = _bsds_folder(tmp_path / "bsds", 4)
    base = ["experiment=paper_bsds_deblur_small", f"problem.data_path={data}",
            "problem.crop=12", "problem.num_samples=2", "problem.num_filters=4",
            "problem.kernel_size=3", "outer.steps=2", "recycle.dim=3", "progress=false"]
    trained = run(_compose(*base), output_dir=tmp_path / "train")
    held_out = [*base, "task=evaluate", "evaluate.split=test", "evaluate.num_samples=3",
                "evaluate.tv_grid=[-2,-1]"]
    grid = [-1.0, 0.0, 1.0]
    ev = run(_compose(*held_out, f"evaluate.theta_path={trained.theta_path}",
                      f"evaluate.strength_grid={grid}", "evaluate.strength_factors=[1.0,2.0]",
                      "evaluate.strength_probes=2"), output_dir=tmp_path / "eval")
    theta = np.load(trained.theta_path)["theta"]
    for s in grid:
        shifted = theta.copy()
        shifted[:, -1] += s  # the exponents
        np.savez(tmp_path / f"theta_{s}.npz", theta=shifted)
    plain = {s: run(_compose(*held_out, f"evaluate.theta_path={tmp_path}/theta_{s}.npz",
                             "tracking=disabled"), output_dir=tmp_path / f"eval_{s}")
             for s in grid}
    for j, row in enumerate(ev.rows):
        assert row.strength in grid
        assert row.psnr_learned == pytest.approx(plain[row.strength].rows[j].psnr_learned,
                                                 abs=1e-9)
        assert row.psnr_learned_as_trained == pytest.approx(plain[0.0].rows[j].psnr_learned,
                                                            abs=1e-9)
        assert (row.psnr_tv, row.psnr_tv_oracle) == (plain[0.0].rows[j].psnr_tv,
                                                     plain[0.0].rows[j].psnr_tv_oracle)
    run_data = MlflowClient(uri).get_run(ev.run_id).data
    # every key is a param, though there are more than the 100 of one MLflow batch
    keys = flatten(validate(_compose(*held_out, f"evaluate.theta_path={trained.theta_path}")))
    assert len(keys) > 100 and set(keys) <= set(run_data.params)
    assert run_data.metrics["strength_factor"] in (1.0, 2.0)
    assert run_data.metrics["mean_strength"] == pytest.approx(
        np.mean([r.strength for r in ev.rows]))
    # an image's probes are its own: evaluated without image 0, images 1 and 2 score alike
    chosen = run_data.metrics["strength_factor"]
    later = run(_compose(*held_out, f"evaluate.theta_path={trained.theta_path}",
                         f"evaluate.strength_grid={grid}", f"evaluate.strength_factors=[{chosen}]",
                         "evaluate.strength_probes=2", "evaluate.offset=1",
                         "evaluate.num_samples=2", "tracking=disabled"),
                output_dir=tmp_path / "eval_later")
    for a, b in zip(ev.rows[1:], later.rows, strict=True):
        assert (a.image, a.strength) == (b.image, b.strength)
        assert a.psnr_learned == pytest.approx(b.psnr_learned, abs=1e-9)
    header = (tmp_path / "eval" / "psnr.txt").read_text().splitlines()[0]
    assert [h.strip() for h in header.strip("|").split("|")][-2:] == ["s", "learned, as trained"]
    bad = [*held_out, f"evaluate.theta_path={trained.theta_path}"]
    with pytest.raises(ConfigError, match=r"^evaluate\.strength_factors"):
        run(_compose(*bad, "evaluate.strength_grid=[0.0]", "evaluate.strength_factors=[0.0]"),
            output_dir=tmp_path / "bad1")
    with pytest.raises(ConfigError, match=r"^evaluate\.strength_grid: the predictive risk"):
        run(_compose(*bad, "evaluate.strength_grid=[0.0]", "problem.operator=inpainting"),
            output_dir=tmp_path / "bad2")


@pytest.mark.parametrize("preset", ["paper_mnist_inpainting", "paper_bsds_deblur",
                                    "paper_bsds_deblur_small"])
def test_data_presets_need_a_data_path(preset):
    with pytest.raises(ConfigError, match=r"^problem\.data_path"):
        validate(_compose(f"experiment={preset}"))


def test_presets_match_the_paper_settings():
    c = validate(_compose("experiment=paper_mnist_inpainting_small"))
    p = c.problem
    assert (p.dataset, p.fraction_removed, p.num_filters, p.kernel_size, p.filters_init) == (
        "embedded_mnist", 0.7, 24, 5, "dct")
    assert (c.stop.rtol, c.solver.lower.gtol, c.recycle.dim, c.backend.dtype) == (
        1e-3, 1e-3, 30, "float64")
    data = "/work/shared/data/bsds300"
    b = _compose("experiment=paper_bsds_deblur", f"problem.data_path={data}")
    assert (b.problem.crop, b.problem.blur_sigma, b.problem.noise_level, b.problem.expert,
            b.outer.lr, b.outer.batch_size) == (64, 3.0, 0.2, "lorentzian", 1e-2, 16)
    # the learning preset solves the same task (images, forward model, noise) with its own
    # regulariser and training: the recipe of the README's run that learned best
    learn = _compose("experiment=bsds_deblur_learn", f"problem.data_path={data}")
    task = ("dataset", "split", "start", "crop", "operator", "blur_sigma", "noise_level",
            "filters_init", "learn")
    assert all(learn.problem[k] == b.problem[k] for k in task)
    lp = learn.problem
    assert (lp.num_samples, lp.normalize, lp.regularizer, lp.tv_gamma, lp.tv_init_exponent) == (
        64, True, "tv_foe", 0.01, -1.7)
    assert (lp.kernel_size, lp.num_filters, lp.expert, lp.gamma, lp.init_exponent) == (
        7, 48, "student_t", 0.05, -4.3)
    assert (lp.boundary, b.problem.boundary) == ("symmetric", "zero")
    assert lp.zero_mean_filters and not b.problem.zero_mean_filters
    assert (lp.upper_loss, lp.mse_floor) == ("neg_psnr", 0.00316)
    assert (learn.solver.lower.name, learn.solver.lower.gtol, learn.solver.preconditioner,
            learn.recycle.strategy) == ("lbfgs", 1e-4, "none", "none")
    assert (learn.outer.name, learn.outer.lr, learn.outer.steps, learn.outer.batch_size) == (
        "lbfgs", 1e-3, 30, None)


def test_recorded_states_solve_the_lower_problem(recorded):
    recording = RecordedSequence.load(recorded.sequence_path)
    be = get_backend("numpy")
    for pos, sample in enumerate(recording.sample_indices):
        problem = problem_from_recording(recording, sample, be)
        for t in range(recording.steps):
            grad = problem.lower_grad(be.asarray(recording.xs[t, pos]),
                                      be.asarray(recording.thetas[t]))
            assert np.linalg.norm(grad) <= 1e-5, (sample, t)


def test_record_resumes_with_its_recording(tmp_path, uri):
    args = [*QUADRATIC, "task=record", "sequence.samples=[0,1]", "checkpoint.every=1"]
    whole = run(_compose(*args), output_dir=tmp_path / "whole")
    run(_compose(*args[:-1], "outer.steps=3", "checkpoint.every=1"), output_dir=tmp_path / "r")
    resumed = run(_compose(*args), output_dir=tmp_path / "r")
    assert resumed.resumed_from_step == 3
    a, b = RecordedSequence.load(whole.sequence_path), RecordedSequence.load(
        resumed.sequence_path)
    np.testing.assert_array_equal(a.thetas, b.thetas)
    np.testing.assert_array_equal(a.xs, b.xs)


def test_console_strategy_sweep_tags_the_runs(tmp_path, uri, recorded):
    script = Path(sys.executable).parent / "hyperkrylov"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "framework.experiment.app"]
    result = subprocess.run(
        [*cmd, "-m", *QUADRATIC, "task=resolve", f"sequence.path={recorded.sequence_path}",
         "method=none,rgen_l_r_nsc", "recycle.dim=3", f"hydra.sweep.dir={tmp_path}/sweep"],
        cwd=tmp_path, env=dict(os.environ, MLFLOW_TRACKING_URI=uri), capture_output=True,
        text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr
    runs = tracking.read_runs(uri, "hyperkrylov", sweep_id=str(tmp_path / "sweep"))
    assert sorted(r.tags["hyperkrylov.label"] for r in runs) == ["RGen-L(R)+NSC", "none"]
    assert {r.tags["hyperkrylov.dim"] for r in runs} == {"0", "3"}
    assert all(r.status == "FINISHED" and r.metrics["systems"] == 5 for r in runs)
