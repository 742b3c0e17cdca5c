"""The sharpness tracker (jax_impl.tracking) and its training loop (jax_impl.track_loop).

References: a quadratic loss whose Hessian is known in closed form; dense Hessian, GGN and
preconditioned Hessian built with jax.hessian / jax.jacfwd (not the Hvp code under test) and
diagonalized by numpy in float64.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from hessian_approx.architecture import mlp
from jax_impl import data, losses, models
from jax_impl.batches import make_batches
from jax_impl.errors import HessianApproxError
from jax_impl.track_loop import track
from jax_impl.tracking import TrackerConfig, adam_preconditioner, measure, tracker_init


def quadratic(n=64, top=4.0, seed=0):
    """Least squares with features X (n, 8) such that XᵀX/n has eigenvalues top, 2, 1, 0.5, ...:
    the loss 0.5 mean (x·w - y)² has the constant Hessian XᵀX/n, λ_max = top."""
    rng = np.random.default_rng(seed)
    u = np.linalg.qr(rng.normal(size=(n, 8)))[0]
    v = np.linalg.qr(rng.normal(size=(8, 8)))[0]
    s2 = np.array([top, 2, 1, 0.5, 0.25, 0.2, 0.1, 0.05])
    x = (u * np.sqrt(s2 * n)) @ v.T
    y = rng.normal(size=(n, 1))
    apply = lambda p, xb: xb @ p["w"]
    ell = lambda z, yb: 0.5 * jnp.sum((z - yb) ** 2, axis=-1)
    return apply, ell, x.astype(np.float32), y.astype(np.float32), top


@pytest.mark.parametrize("lr_times, diverges", [(0.9, False), (1.1, True)])
def test_quadratic_sharpness_is_analytic_and_gd_diverges_above_two_over_lambda(lr_times, diverges):
    apply, ell, x, y, top = quadratic()
    lr = lr_times * 2 / top
    params = {"w": jnp.zeros((8, 1), jnp.float32)}
    r = track(apply, ell, params, optax.sgd(lr), x, y, steps=120, every=10, key=jax.random.PRNGKey(0),
              config=TrackerConfig(tol=1e-4), log_every=1)
    # the Hessian is XᵀX/n at every step: λ_max = top (tolerance: the residual bound tol·|θ| plus
    # float32 rounding of the matvec, ~1e-6 relative)
    np.testing.assert_allclose(r.metrics["sharpness"], top, rtol=2e-4)
    assert (r.diverged_at is not None) == diverges
    # closed form of GD on a quadratic: the error along eigenvector i scales by (1 - ηλ_i) per step
    xd, yd = x.astype(np.float64), y.astype(np.float64)
    lam, vec = np.linalg.eigh(xd.T @ xd / len(xd))
    w_star = np.linalg.lstsq(xd, yd, rcond=None)[0]
    e0 = vec.T @ (0 - w_star)[:, 0]
    floor = 0.5 * np.mean((xd @ w_star - yd) ** 2)
    t = np.arange(len(r.train_loss))[:, None]
    theory = floor + 0.5 * np.sum(lam * (1 - lr * lam) ** (2 * t) * e0 ** 2, axis=1)
    np.testing.assert_allclose(r.train_loss, theory, rtol=1e-3)
    if diverges:  # stops at the first loss above 10^4 times the first one, as theory says
        assert r.diverged_at == int(np.argmax(theory > 1e4 * theory[0]))
    else:
        assert np.all(np.diff(r.train_loss) <= 1e-6)


@functools.lru_cache(maxsize=1)
def small_mlp():
    ds = data.load_digits()
    arch = mlp(64, (8,), 10, "tanh")
    x = models.as_inputs(arch, ds.x_train[:300]).astype(np.float32)
    y = ds.y_train[:300]
    params = models.init_params(arch, jax.random.PRNGKey(0))
    return arch, models.make_apply(arch), losses.get_loss("cross_entropy"), params, x, y


@functools.lru_cache(maxsize=1)
def adam_after(steps=5, lr=1e-2):
    """Parameters and Adam state after a few full-batch steps on the small MLP."""
    arch, apply, ell, params, x, y = small_mlp()
    opt = optax.adam(lr)
    s = opt.init(params)

    @jax.jit
    def step(params, s):
        u, s = opt.update(jax.grad(lambda p: jnp.mean(ell(apply(p, x), y)))(params), s, params)
        return optax.apply_updates(params, u), s

    for _ in range(steps):
        params, s = step(params, s)
    return params, s


def dense_references(params, opt_state, lr_b2=0.999, eps=1e-8):
    """(λ_max(H), tr H, λ_max(GGN), λ_max(P⁻¹H)) from jax.hessian / jax.jacfwd, numpy float64."""
    arch, apply, ell, _, x, y = small_mlp()
    flat, unravel = ravel_pytree(params)
    both = jax.jit(lambda f: (jax.hessian(lambda g: jnp.mean(ell(apply(unravel(g), x), y)))(f),
                              jax.jacfwd(lambda g: apply(unravel(g), x))(f)))  # (d, d), (n, C, d)
    h, jac = (np.asarray(a, np.float64) for a in both(flat))
    z = np.asarray(apply(params, x), np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    hz = np.einsum("nc,cd->ncd", p, np.eye(p.shape[1])) - np.einsum("nc,nd->ncd", p, p)
    hj = np.einsum("ncd,ndj->ncj", hz, jac)
    ggn = jac.reshape(-1, jac.shape[-1]).T @ hj.reshape(-1, jac.shape[-1]) / len(x)
    nu = np.asarray(ravel_pytree(opt_state[0].nu)[0], np.float64)
    t = int(opt_state[0].count)
    pre = np.sqrt(nu / (1 - lr_b2 ** t)) + eps
    hp = h / np.sqrt(pre)[:, None] / np.sqrt(pre)[None, :]
    sym = lambda m: np.linalg.eigvalsh((m + m.T) / 2)[-1]
    return sym(h), np.trace(h), sym(ggn), sym(hp)


CONFIG = TrackerConfig(k=2, tol=1e-4, trace="xtrace", trace_matvecs=60, ggn=True, preconditioned=True)


@functools.lru_cache(maxsize=2)
def run_measure(jit: bool):
    """(state, metrics) of one measurement after five Adam steps, jitted or eager (each computed once)."""
    params, opt_state = adam_after()
    arch, apply, ell, _, x, y = small_mlp()
    b = make_batches(x, y, chunk_size=100)
    fn = functools.partial(measure, CONFIG, apply, ell, preconditioner=adam_preconditioner())
    if jit:
        fn = jax.jit(fn)
    return fn(params, b, tracker_init(CONFIG, params), jax.random.PRNGKey(4), opt_state)


def test_measure_against_dense_references():
    params, opt_state = adam_after()
    _, m = run_measure(jit=True)
    lam, tr, lam_ggn, lam_pre = dense_references(params, opt_state)
    # residual bound tol·|θ| (1e-4) plus float32 rounding of the Hvp (~1e-5 relative here)
    np.testing.assert_allclose(float(m["sharpness"]), lam, rtol=2e-4)
    np.testing.assert_allclose(float(m["ggn_sharpness"]), lam_ggn, rtol=2e-4)
    np.testing.assert_allclose(float(m["preconditioned_sharpness"]), lam_pre, rtol=2e-4)
    # XTrace is unbiased with the stated standard error: within 4 of them (a 1-in-15,000 miss
    # for a Gaussian error), or exact to rounding when its sketch captures the spectrum
    assert abs(float(m["trace"]) - tr) <= 4 * float(m["trace_stderr"]) + 1e-4 * abs(tr)
    assert m["eigenvalues"].shape == (2,) and bool(m["converged"])


def test_measure_gives_the_same_values_inside_jit_as_outside():
    s_eager, eager = run_measure(jit=False)
    s_jit, jitted = run_measure(jit=True)
    assert set(eager) == set(jitted)
    for name in eager:
        np.testing.assert_allclose(np.asarray(eager[name], float), np.asarray(jitted[name], float), rtol=1e-4,
                                   atol=1e-6, err_msg=name)
    np.testing.assert_allclose(np.asarray(s_eager.hessian), np.asarray(s_jit.hessian), atol=1e-3)


def test_warm_start_saves_matvecs_along_training():
    arch, apply, ell, params, x, y = small_mlp()
    counts = {}
    for warm in (True, False):
        r = track(apply, ell, params, optax.sgd(0.5), x, y, steps=60, every=5, key=jax.random.PRNGKey(0),
                  config=TrackerConfig(tol=1e-4, warm_start=warm))
        counts[warm] = r.metrics["lanczos_matvecs"][1:]  # the first measurement has nothing to start from
        assert np.all(r.metrics["converged"])
    assert counts[True].sum() < counts[False].sum(), counts


def test_preconditioned_is_undefined_before_the_first_adam_step():
    arch, apply, ell, params, x, y = small_mlp()
    r = track(apply, ell, params, optax.adam(1e-2), x, y, steps=10, every=5, key=jax.random.PRNGKey(0),
              config=TrackerConfig(preconditioned=True), preconditioner=adam_preconditioner())
    pre = r.metrics["preconditioned_sharpness"]
    assert np.isnan(pre[0]) and np.all(np.isfinite(pre[1:]))


@pytest.mark.parametrize("kwargs, words", [
    (dict(tol=0), "tol=0"), (dict(k=0), "k=0"), (dict(trace="hutch"), "trace='hutch'"),
    (dict(trace="xtrace", trace_matvecs=2), "trace_matvecs=2"), (dict(mix=-1), "mix=-1"),
])
def test_bad_config_is_a_one_line_error(kwargs, words):
    with pytest.raises(HessianApproxError, match=words):
        TrackerConfig(**kwargs)


def test_bad_loop_arguments_are_one_line_errors():
    apply, ell, x, y, _ = quadratic()
    params = {"w": jnp.zeros((8, 1), jnp.float32)}
    with pytest.raises(HessianApproxError, match="batch_size=65"):
        track(apply, ell, params, optax.sgd(0.1), x, y, steps=5, every=1, key=jax.random.PRNGKey(0), batch_size=65)
    with pytest.raises(HessianApproxError, match="preconditioned sharpness needs"):
        track(apply, ell, params, optax.sgd(0.1), x, y, steps=5, every=1, key=jax.random.PRNGKey(0),
              config=TrackerConfig(preconditioned=True))
