"""The trace-estimator study on a small digits MLP: structure, numbers checked independently, figure, report."""

import copy
import re

import jax
import numpy as np
import pytest
from PIL import Image

from benchmarks import registry
from benchmarks.context import Context, Options
from benchmarks.trace_study import (ESTIMATORS, LABELS, budgets, fig_trace_study, findings, matvecs_to,
                                    report_section, trace_study)
from jax_impl import algorithms
from jax_impl.algorithms import sketch_trace
from jax_impl.errors import HessianApproxError

MAX, SEEDS = 24, 6
TORCH = registry.torch_available() is None


@pytest.fixture(scope="module")
def ctx():
    return Context(Options(dataset="digits", hidden=(6,), hessian_samples=50, epochs=2))


@pytest.fixture(scope="module")
def study(ctx):
    return trace_study(ctx, max_matvecs=MAX, seeds=SEEDS, torch_ok=TORCH)


def test_budgets():
    assert budgets(384) == [6, 12, 24, 48, 96, 192, 384]
    assert budgets(400) == budgets(384) and budgets(6) == [6]
    assert all(b % 6 == 0 for b in budgets(10_000))
    for bad in (5, 0, 6.0, True):
        with pytest.raises(HessianApproxError):
            budgets(bad)


def test_matvecs_to():
    assert matvecs_to([0.5, 0.02, 0.009, 0.011], [6, 12, 24, 48]) == 24
    assert matvecs_to([0.5, 0.02], [6, 12]) is None
    assert matvecs_to([0.01], [6]) == 6


def test_structure_and_numbers(ctx, study):
    grid = study["budgets"]
    assert grid == [6, 12, 24] and study["seeds"] == SEEDS and study["dim"] == ctx.problem.dim
    h, g = (np.asarray(m, np.float64) for m in (ctx.hessian[0], ctx.ggn[0]))
    assert study["reference"]["hessian"]["trace"] == pytest.approx(np.trace(h), rel=1e-12)
    assert study["reference"]["ggn"]["fro"] == pytest.approx(np.linalg.norm(g), rel=1e-12)
    assert set(study["estimators"]) == set(ESTIMATORS)
    for name, e in study["estimators"].items():
        assert e["operator"] == ESTIMATORS[name]
        if name == "pyhessian:trace" and not TORCH:
            assert e["status"] == "not run"
            continue
        ref = study["reference"][e["operator"]]
        est = np.asarray(e["estimates"])
        assert est.shape == (SEEDS, len(grid)) and np.all(np.isfinite(est))
        assert np.std(est[:, 0]) > 0, f"{name}: every seed gave the same estimate"
        for key, norm in (("rel_err_trace", abs(ref["trace"])), ("rel_err_fro", ref["fro"])):
            err = np.abs(est - ref["trace"]) / norm
            np.testing.assert_allclose(e[key]["mean"], err.mean(0), rtol=1e-12)
            assert np.all(np.asarray(e[key]["q10"]) <= np.asarray(e[key]["q90"]))
            np.testing.assert_allclose(e[key]["q90"], np.quantile(err, 0.9, axis=0), rtol=1e-12)
        hit = e["matvecs_to_1pct"]
        mean = np.asarray(e["rel_err_trace"]["mean"])
        assert hit is None or hit in grid
        assert hit == (grid[int(np.argmax(mean <= 0.01))] if np.any(mean <= 0.01) else None)
        assert e["seconds"] > 0


def test_sketches_improve_with_budget(study):
    for name in ("hutchpp", "xtrace", "xnystrace"):
        mean = study["estimators"][name]["rel_err_trace"]["mean"]
        assert mean[-1] < mean[0], (name, mean)


def test_estimates_are_the_estimators_own(ctx, study):
    """A stored estimate is what the library function returns for that seed's key and budget."""
    s = 2
    hu = algorithms.hutchinson(ctx.hvp, jax.random.fold_in(ctx.key("trace-study-hutchinson"), s), num_samples=12)
    assert study["estimators"]["hutchinson"]["estimates"][s][1] == pytest.approx(float(hu.trace), rel=1e-5)
    ny = sketch_trace.xnystrace(ctx.ggn_vp, jax.random.fold_in(ctx.key("trace-study-xnystrace"), s), num_matvecs=6)
    assert study["estimators"]["xnystrace"]["estimates"][s][0] == pytest.approx(float(ny.trace), rel=1e-4)


@pytest.mark.parametrize("name", ["hutchinson", "pyhessian:trace"])
def test_hutchinson_runs_are_unbiased_with_the_known_variance(ctx, study, name):
    """Mean over seeds at the largest budget b lies within 4 sigma of tr(H), sigma^2 = 2 (||H||_F^2 -
    sum H_ii^2) / (b seeds): PyHessian's probes are torch's, so this is how its row is checked."""
    if name == "pyhessian:trace" and not TORCH:
        pytest.skip("the torch extra is not installed")
    h = np.asarray(ctx.hessian[0], np.float64)
    var = 2 * (np.sum(h ** 2) - np.sum(np.diag(h) ** 2)) / (MAX * SEEDS)
    est = np.asarray(study["estimators"][name]["estimates"])[:, -1]
    assert abs(est.mean() - np.trace(h)) < 4 * np.sqrt(var)
    # and the spread over seeds is of the theory's size (chi-square with 5 dof over 5: 0.04 .. 4.1 at 1e-3 each side)
    assert 0.04 < est.var(ddof=1) / (var * SEEDS) < 4.1


def test_torch_off_and_bad_arguments(ctx):
    small = trace_study(ctx, max_matvecs=6, seeds=2, torch_ok=False)
    assert small["budgets"] == [6]
    e = small["estimators"]["pyhessian:trace"]
    assert e["status"] == "not run" and "torch_ok" in e["reason"]
    assert "not run" in report_section(small)
    with pytest.raises(HessianApproxError, match="seeds"):
        trace_study(ctx, max_matvecs=6, seeds=1)
    with pytest.raises(HessianApproxError, match="max_matvecs"):
        trace_study(ctx, max_matvecs=3, seeds=2)


def test_figure_written_atomically(study, tmp_path):
    fig_trace_study(study, tmp_path / "fig_trace_study.png")
    assert [p.name for p in tmp_path.iterdir()] == ["fig_trace_study.png"]  # no temporary left behind
    img = np.asarray(Image.open(tmp_path / "fig_trace_study.png").convert("L"), float)
    assert img.shape[0] > 300 and img.shape[1] > 600 and img.std() > 10
    # a not-run estimator and an exact (zero-error) one still draw
    other = copy.deepcopy(study)
    other["estimators"]["pyhessian:trace"] = {"operator": "hessian", "status": "not run", "reason": "x"}
    for q in ("mean", "q10", "q90"):
        other["estimators"]["xtrace"]["rel_err_trace"][q] = [0.0] * len(study["budgets"])
    fig_trace_study(other, tmp_path / "other.png")
    assert (tmp_path / "other.png").stat().st_size > 0


def _rows(text: str) -> dict:
    return {c[0]: c for c in ([x.strip() for x in line.strip("|").split("|")] for line in text.splitlines()
                              if line.startswith("| ") and not line.startswith("| estimator"))}


def test_report_section(study):
    text = report_section(study)
    rows = _rows(text)
    assert set(rows) == set(ESTIMATORS)
    grid = study["budgets"]
    for name, e in study["estimators"].items():
        if "status" in e:
            assert "not run" in rows[name][2]
            continue
        hit = e["matvecs_to_1pct"]
        assert rows[name][2] == (str(hit) if hit is not None else f"not within {grid[-1]}")
        cell = rows[name][3]
        value = float(cell.rstrip("%")) / (100 if cell.endswith("%") else 1)
        assert value == pytest.approx(e["rel_err_trace"]["mean"][-1], rel=5e-3, abs=1e-6)
    base = np.asarray(study["estimators"]["hutchinson"]["rel_err_trace"]["mean"])
    wins = int(np.sum(np.asarray(study["estimators"]["xtrace"]["rel_err_trace"]["mean"]) < base))
    assert f"XTrace beat Hutchinson at {wins} of {len(grid)} equal budgets" in text


def test_findings_follow_the_numbers():
    """Hand-made numbers: XTrace worse than Hutchinson, Hutch++ better, only Hutch++ reaches 1%."""
    def entry(mean, hit):
        s = {"mean": mean, "q10": mean, "q90": mean}
        return {"operator": "hessian", "rel_err_trace": s, "rel_err_fro": s, "matvecs_to_1pct": hit, "seconds": 1.0}

    study = {"budgets": [6, 12], "seeds": 2, "model": "m",
             "reference": {"hessian": {"trace": 1.0, "fro": 2.0}, "ggn": {"trace": 1.0, "fro": 2.0}},
             "estimators": {"hutchinson": entry([0.2, 0.1], None), "xtrace": entry([0.3, 0.2], None),
                            "hutchpp": entry([0.05, 0.005], 12)}}
    text = " ".join(findings(study))
    assert "XTrace beat Hutchinson at 0 of 2" in text and "2.0x larger than" in text
    assert "Hutch++ beat Hutchinson at 2 of 2" in text and "20.0x smaller than" in text
    assert re.search(r"Hutch\+\+ from 12 matvecs; Hutchinson, XTrace did not within 12", text)
    assert LABELS["hutchpp"] in report_section(study)
