"""crosscheck end to end: JAX and PyTorch agree on the same weights (float64 near machine precision)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("torch", reason="the torch extra is not installed")
pytest.importorskip("pyhessian", reason="the torch extra is not installed")

from benchmarks.cli import main  # noqa: E402
from benchmarks.context import Context, Options  # noqa: E402
from benchmarks.methods_torch import twin  # noqa: E402
from bridge import permutation  # noqa: E402
from jax_impl import algorithms  # noqa: E402
from torch_ref import pyhessian_runner  # noqa: E402

SMALL = ["--dataset", "digits", "--hidden", "6", "--hessian-samples", "150", "--epochs", "3", "-k", "4"]


@pytest.mark.usefixtures("x64_if_float64")
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10)])  # float32: test_reproduce_small's crosscheck (1e-5)
def test_crosscheck_command(tmp_path, capsys, dtype, tol):
    js = tmp_path / "cc.json"
    code = main(["crosscheck", *SMALL, "--dtype", dtype, "--json", str(js)])
    out = capsys.readouterr().out
    assert code == 0 and "torch vs JAX" in out
    rec = json.loads(js.read_text())
    cc = rec["crosscheck"]
    # float64: both frameworks differ only in summation order (~1e-15); float32: ~1e-7 rounding
    assert cc["loss"]["rel_err"] < tol
    assert cc["gradient"]["rel_frobenius"] < tol
    assert cc["hvp"]["max_rel_frobenius"] < tol
    assert cc["hessian"]["rel_frobenius"] < tol
    assert cc["hessian"]["eigenvalues"]["max_rel"] < tol * 10  # eigenvalues amplify by the condition
    res = rec["results"]
    np.testing.assert_allclose(res["torch:exact"]["eigenvalues"], res["exact"]["eigenvalues"], rtol=tol * 10)
    # PyHessian (tol 1e-3 on successive Rayleigh quotients) lands within a few 1e-3 of exact
    np.testing.assert_allclose(res["pyhessian"]["eigenvalues"][:2], res["exact"]["eigenvalues"][:2], rtol=2e-2)


def test_jax_power_iteration_follows_pyhessian_iterates(x64):
    ctx = Context(Options(dataset="digits", hidden=(6,), hessian_samples=100, epochs=3, dtype="float64"))
    model, x, y = twin(ctx)
    d = ctx.problem.dim
    starts_torch = np.random.default_rng(3).standard_normal((3, d))
    ph = pyhessian_runner.top_eigenvalues(model, x, y, "cross_entropy", k=3, max_iter=50, tol=1e-4,
                                          start_vectors=starts_torch)
    v0 = jnp.asarray(np.stack([permutation.to_jax_vector(s, ctx.arch) for s in starts_torch]))
    res = algorithms.power_iteration(ctx.hvp, jax.random.PRNGKey(0), k=3, max_iter=50, tol=1e-4, v0=v0)
    # same start, same arithmetic up to summation order: the iterates coincide to ~1e-12
    np.testing.assert_allclose(np.asarray(res.eigenvalues), ph["eigenvalues"], rtol=1e-10)
    assert int(res.matvecs) == ph["matvecs"]
    vecs = np.stack([permutation.to_jax_vector(v, ctx.arch) for v in ph["eigenvectors"]])
    np.testing.assert_allclose(np.asarray(res.eigenvectors), vecs, atol=1e-8)
