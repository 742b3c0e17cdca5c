"""The method table is the one registry: every entry has one implementation; commands query it; the new
estimators run end to end on the digits MLP and agree with the exact Hessian."""

import json

import numpy as np
import pytest

from benchmarks import cli, registry, table

SMALL = ["--dataset", "digits", "--hidden", "6", "--hessian-samples", "100", "--epochs", "2", "--dtype", "float64"]


def test_every_entry_has_exactly_one_implementation():
    impl = registry.load()
    torch_ok = registry.torch_available() is None
    expected = {n for n, e in table.TABLE.items() if e.framework == "jax" or torch_ok}
    assert set(impl) == expected


def test_counterparts_point_both_ways_and_families_are_known():
    for name, e in table.TABLE.items():
        assert e.family in table.FAMILIES
        if e.counterpart is not None:
            other = table.TABLE[e.counterpart]
            assert other.framework != e.framework and other.family == e.family, name


def test_commands_are_queries_on_the_table():
    assert cli.default_methods("trace") == [n for n, e in table.TABLE.items() if "trace" in e.commands]
    assert {"hutchpp", "xtrace", "xnystrace"} <= set(cli.default_methods("trace"))
    assert set(table.approximations()) == {"diag-ggn", "diag-ggn-mc", "diag-h", "kfac", "kflr", "kfra"}


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    out = tmp_path_factory.mktemp("t") / "r.json"
    methods = "exact,lanczos-certified,block-lanczos,hutchpp,xtrace,xnystrace,hutchinson-diag,xdiag,blocks,ggn"
    import jax

    with jax.enable_x64(True):
        assert cli.main(["eigs", *SMALL, "--methods", methods, "--hutchinson-samples", "120", "--tol", "1e-8",
                         "--json", str(out)]) == 0
    jax.config.update("jax_enable_x64", False)
    return json.loads(out.read_text())["results"]


def test_certified_lanczos_meets_its_tolerance_against_the_exact_spectrum(record):
    exact = np.asarray(record["exact"]["eigenvalues"])
    cert = record["lanczos-certified"]
    assert all(cert["converged"])
    # |θ - λ| <= the reported bound, and the residuals meet tol·|θ₁|
    assert np.all(np.abs(np.asarray(cert["eigenvalues"]) - exact) <= np.asarray(cert["error_bounds"]) + 1e-12)
    assert max(cert["residuals"]) <= 1e-8 * abs(exact[0]) * 1.0001


def test_block_lanczos_top_eigenvalues(record):
    exact = np.asarray(record["exact"]["eigenvalues"])
    np.testing.assert_allclose(record["block-lanczos"]["eigenvalues"], exact, rtol=1e-6, atol=1e-8 * abs(exact[0]))


@pytest.mark.parametrize("name", ["hutchpp", "xtrace"])
def test_sketched_traces_within_five_standard_errors(record, name):
    e = record[name]
    assert abs(e["trace"] - record["exact"]["trace"]) <= 5 * e["stderr"] + 1e-9 and e["matvecs"] <= 120


def test_xnystrace_is_on_the_ggn(record):
    e = record["xnystrace"]
    assert e["operator"] == "ggn" and abs(e["trace"] - record["ggn"]["trace"]) <= 5 * e["stderr"] + 1e-9


@pytest.mark.parametrize("name", ["hutchinson-diag", "xdiag"])
def test_diagonal_estimators_sum_near_the_trace(record, name):
    e = record[name]
    assert 0 <= e["diag_rel_err"] < 1 and e["matvecs"] <= 120


def test_per_layer_blocks_cover_the_trace(record):
    b = record["blocks"]
    assert set(b["blocks"]) == {"Dense_0", "Dense_1"}
    assert b["trace"] == pytest.approx(record["exact"]["trace"], rel=1e-9)  # blocks cover every parameter
