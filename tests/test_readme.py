"""The README's "Your own model" examples run as written (float32, as a user runs them)."""

import re

import numpy as np
import pytest

from tests.conftest import REPO

pytest.importorskip("torch", reason="the PyTorch example needs torch")


def examples() -> dict[str, str]:
    """{name: code} of every ```python block preceded by <!-- example: name --> in the README."""
    text = (REPO / "README.md").read_text()
    return dict(re.findall(r"<!-- example: (\w+) -->\s*```python\n(.*?)```", text, flags=re.S))


def test_the_readme_has_its_examples():
    assert set(examples()) == {"flax", "torch", "track"}


def test_readme_track_example_runs():
    """The tracked sharpness at the last step is the top eigenvalue of the dense Hessian there."""
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    scope: dict = {}
    exec(compile(examples()["track"], "README.md example track", "exec"), scope)
    run, apply, x, y = scope["run"], scope["models"].make_apply(scope["arch"]), scope["x"], scope["y"]
    assert list(run.steps) == list(range(0, 101, 10)) and run.diverged_at is None
    flat, unravel = ravel_pytree(run.params)
    loss = lambda f: jnp.mean(scope["losses"].cross_entropy(apply(unravel(f), x), y))
    lam = np.linalg.eigvalsh(np.asarray(jax.jit(jax.hessian(loss))(flat), np.float64))[-1]
    # the tracker's residual bound, tol 1e-3 of |θ|, plus float32 rounding
    assert abs(run.metrics["sharpness"][-1] - lam) <= 1e-3 * abs(lam) + 1e-5


@pytest.mark.parametrize("name", ["flax", "torch"])
def test_readme_example_runs(name, tmp_path, monkeypatch):
    import torch

    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)  # the torch example writes model.pt
    code = examples()[name]
    scope: dict = {}
    exec(compile(code, f"README.md example {name}", "exec"), scope)
    H = scope["H"]
    if name == "flax":  # the example's results are the ones a dense eigendecomposition gives
        # LAPACK's dense symmetric eigensolver (syevd) in float64 through torch: MKL on one thread takes ~2 s
        # for this d = 3530, numpy's OpenBLAS eigvalsh 10-20 s of CPU on the 2-core test machine
        exact = torch.linalg.eigvalsh(torch.from_numpy(np.asarray(H.dense(), np.float64))).numpy()[::-1]
        # float32 Hvps against a float64 eigendecomposition of the float32 matrix: 1e-4 of lambda_1
        np.testing.assert_allclose(scope["top"].eigenvalues, exact[:10], rtol=0, atol=1e-4 * abs(exact[0]))
        assert abs(float(scope["tr"].trace) - exact.sum()) < 5 * float(scope["tr"].stderr)
    else:
        assert scope["info"]["architecture_source"] == "inferred from tensor shapes"
        assert scope["kfac"].trace() > 0


def test_the_api_takes_five_lines():
    after = examples()["flax"].split("import jax_impl as ha")[1].splitlines()[1:]
    lines = [l for l in after if l.strip() and not l.lstrip().startswith("#")]
    assert len(lines) + 1 == 5  # the import and four calls: PyHessian's example is five lines too
