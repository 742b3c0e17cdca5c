"""Per-sample losses against torch, their checked targets and errors, and their Hessians against output_hessian."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jax_impl import losses
from jax_impl.errors import HessianApproxError
from jax_impl.losses import cross_entropy, get_loss, mse, output_hessian

torch.set_num_threads(1)

B, C = 8, 5

# float64: both libraries evaluate the same few operations (log-sum-exp over C = 5 terms,
# squares and a mean) in a different order, each rounding error ~1e-16 relative, so they
# agree to a few 1e-16; 1e-12 relative leaves ample room and still catches any wrong term.
RTOL64 = 1e-12
# float32: eps = 1.2e-7 and the same few operations, so ~1e-6 relative at worst; 1e-5.
RTOL32 = 1e-5


def rel(a, b):
    """Normwise relative error (entries near 0, e.g. off-diagonal Hessian entries, are measured against the max)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


def data(rng, dtype=np.float64):
    """Logits (B, C), int labels (B,), class probabilities (B, C), one-hot rows (B, C), real targets (B, C)."""
    z = (3 * rng.standard_normal((B, C))).astype(dtype)
    y = rng.integers(0, C, B).astype(np.int32)
    p = rng.dirichlet(np.ones(C), B).astype(dtype)
    onehot = np.eye(C, dtype=dtype)[y]
    t = rng.standard_normal((B, C)).astype(dtype)
    return z, y, p, onehot, t


def torch_ce(z, t):
    t = torch.tensor(t, dtype=torch.int64) if t.dtype.kind in "iu" else torch.tensor(t)
    return F.cross_entropy(torch.tensor(z), t, reduction="none").numpy()


def torch_mse(z, t):
    return F.mse_loss(torch.tensor(z), torch.tensor(t), reduction="none").mean(-1).numpy()


def one_line_error(fn, *args):
    with pytest.raises(HessianApproxError) as err:
        fn(*args)
    msg = str(err.value)
    assert "\n" not in msg and msg == f"{err.value.problem}; {err.value.fix}"
    return msg


# ---- values against torch, float64 ----

def test_cross_entropy_int_labels_match_torch(x64, rng):
    z, y, *_ = data(rng)
    assert rel(cross_entropy(jnp.asarray(z), jnp.asarray(y)), torch_ce(z, y)) < RTOL64


def test_cross_entropy_probability_targets_match_torch(x64, rng):
    z, _, p, *_ = data(rng)
    assert rel(cross_entropy(jnp.asarray(z), jnp.asarray(p)), torch_ce(z, p)) < RTOL64


def test_cross_entropy_one_hot_targets_equal_labels(x64, rng):
    z, y, _, onehot, _ = data(rng)
    got = cross_entropy(jnp.asarray(z), jnp.asarray(onehot))
    assert rel(got, cross_entropy(jnp.asarray(z), jnp.asarray(y))) < RTOL64


def test_cross_entropy_integer_one_hot_targets_are_cast(x64, rng):
    z, y, _, onehot, _ = data(rng)
    got = cross_entropy(jnp.asarray(z), jnp.asarray(onehot.astype(np.int32)))
    assert got.dtype == jnp.float64 and rel(got, torch_ce(z, y)) < RTOL64


def test_mse_int_labels_match_torch_one_hot(x64, rng):
    z, y, _, onehot, _ = data(rng)
    assert rel(mse(jnp.asarray(z), jnp.asarray(y)), torch_mse(z, onehot)) < RTOL64


def test_mse_real_targets_match_torch(x64, rng):
    z, *_, t = data(rng)
    assert rel(mse(jnp.asarray(z), jnp.asarray(t)), torch_mse(z, t)) < RTOL64


def test_mse_integer_full_shape_targets_are_values(x64, rng):
    z = 3 * rng.standard_normal((B, C))
    t = rng.integers(-3, 4, (B, C))
    got = mse(jnp.asarray(z), jnp.asarray(t))
    assert got.dtype == jnp.float64 and rel(got, torch_mse(z, t.astype(np.float64))) < RTOL64


def test_mse_single_output_matches_torch(x64, rng):
    z, t = rng.standard_normal(B), rng.standard_normal(B)
    want = F.mse_loss(torch.tensor(z), torch.tensor(t), reduction="none").numpy()
    assert rel(mse(jnp.asarray(z), jnp.asarray(t)), want) < RTOL64


def test_lower_precision_targets_are_accepted(x64, rng):
    z, _, p, *_ = data(rng)
    got = cross_entropy(jnp.asarray(z), jnp.asarray(p, jnp.float32))
    assert got.dtype == jnp.float64
    assert rel(got, torch_ce(z, p.astype(np.float32).astype(np.float64))) < RTOL64


def test_out_of_range_labels_give_nan(x64, rng):
    z = jnp.asarray(rng.standard_normal((4, C)))
    y = jnp.asarray([0, -1, C, C - 1], jnp.int32)
    for ell in (cross_entropy, mse):
        assert np.isnan(np.asarray(ell(z, y))).tolist() == [False, True, True, False]


# ---- float32 (no x64) ----

@pytest.mark.parametrize("kind", ["labels", "probs"])
def test_cross_entropy_float32(rng, kind):
    z, y, p, *_ = data(rng, np.float32)
    t = y if kind == "labels" else p
    got = cross_entropy(jnp.asarray(z), jnp.asarray(t))
    assert got.dtype == jnp.float32
    assert rel(got, torch_ce(z.astype(np.float64), t if kind == "labels" else p.astype(np.float64))) < RTOL32


@pytest.mark.parametrize("kind", ["labels", "real"])
def test_mse_float32(rng, kind):
    z, y, _, onehot, t = data(rng, np.float32)
    got = mse(jnp.asarray(z), jnp.asarray(y if kind == "labels" else t))
    assert got.dtype == jnp.float32
    assert rel(got, torch_mse(z.astype(np.float64), (onehot if kind == "labels" else t).astype(np.float64))) < RTOL32


def test_float16_targets_are_cast_to_float32(rng):
    z, *_, t = data(rng, np.float32)
    got = mse(jnp.asarray(z), jnp.asarray(t, jnp.float16))
    assert got.dtype == jnp.float32
    assert rel(got, torch_mse(z.astype(np.float64), t.astype(np.float16).astype(np.float64))) < RTOL32


def test_works_under_jit(rng):
    z, _, p, *_ = data(rng, np.float32)
    z, p = jnp.asarray(z), jnp.asarray(p)
    assert rel(jax.jit(cross_entropy)(z, p), cross_entropy(z, p)) < RTOL32


# ---- Hessians w.r.t. the outputs ----

def per_sample_hessian(ell, z, t):
    """(B, C, C): jax.hessian of each sample's loss (jit: one compilation beats eager op-by-op dispatch)."""
    return jax.jit(jax.vmap(jax.hessian(lambda zn, tn: ell(zn[None], tn[None])[0])))(z, t)


HESSIAN_CASES = {
    "ce-labels": ("cross_entropy", lambda y, p, oh, t: y),
    "ce-probs": ("cross_entropy", lambda y, p, oh, t: p),
    "ce-onehot": ("cross_entropy", lambda y, p, oh, t: oh),
    "ce-int-onehot": ("cross_entropy", lambda y, p, oh, t: oh.astype(np.int32)),
    "mse-labels": ("mse", lambda y, p, oh, t: y),
    "mse-onehot": ("mse", lambda y, p, oh, t: oh),
    "mse-real": ("mse", lambda y, p, oh, t: t),
    "mse-int": ("mse", lambda y, p, oh, t: (3 * t).astype(np.int32)),
}


@pytest.mark.parametrize("case", list(HESSIAN_CASES))
def test_autodiff_hessian_equals_output_hessian(x64, rng, case):
    name, pick = HESSIAN_CASES[case]
    z, *rest = data(rng)
    h = per_sample_hessian(get_loss(name), jnp.asarray(z), jnp.asarray(pick(*rest)))
    assert h.shape == (B, C, C) and rel(h, output_hessian(name, jnp.asarray(z))) < RTOL64


def test_cross_entropy_hessian_scales_with_target_mass(x64, rng):
    z, _, p, *_ = data(rng)
    mass = rng.uniform(0.5, 3.0, B)
    h = per_sample_hessian(cross_entropy, jnp.asarray(z), jnp.asarray(p * mass[:, None]))
    assert rel(h, mass[:, None, None] * np.asarray(output_hessian("cross_entropy", jnp.asarray(z)))) < RTOL64


def test_single_output_mse_hessian_is_two(x64, rng):
    z, t = jnp.asarray(rng.standard_normal(B)), jnp.asarray(rng.standard_normal(B))
    h = per_sample_hessian(mse, z, t)
    assert rel(h, output_hessian("mse", z[:, None])[:, 0, 0]) < RTOL64


# ---- get_loss ----

def test_get_loss_keeps_builtin_identity():
    assert get_loss("cross_entropy") is cross_entropy and get_loss("mse") is mse
    assert get_loss(cross_entropy) is cross_entropy and losses.LOSSES["mse"] is mse


def test_get_loss_wraps_a_per_sample_callable(rng):
    def l1(z, t):
        return jnp.sum(jnp.abs(z - t), axis=-1)

    ell = get_loss(l1)
    z, *_, t = data(rng, np.float32)
    assert ell.__name__ == "l1" and get_loss(ell) is ell
    assert rel(ell(jnp.asarray(z), jnp.asarray(t)), np.abs(z - t).sum(-1)) < RTOL32


# ---- errors: one line, naming the shapes / dtypes ----

def test_cross_entropy_wrong_class_count():
    msg = one_line_error(cross_entropy, jnp.zeros((32, 10), jnp.float32), jnp.zeros((32, 3), jnp.float32))
    assert "(32, 3)" in msg and "(32, 10)" in msg and "integer labels of shape (32,)" in msg


def test_cross_entropy_float_labels():
    msg = one_line_error(cross_entropy, jnp.zeros((4, 3), jnp.float32), jnp.zeros((4,), jnp.float32))
    assert "(4,)" in msg and "float32" in msg and "(4, 3)" in msg


def test_cross_entropy_batch_mismatch():
    msg = one_line_error(cross_entropy, jnp.zeros((4, 3), jnp.float32), jnp.zeros((5,), jnp.int32))
    assert "(5,)" in msg and "(4, 3)" in msg


def test_cross_entropy_outputs_not_2d():
    msg = one_line_error(cross_entropy, jnp.zeros((4,), jnp.float32), jnp.zeros((4,), jnp.int32))
    assert "(4,)" in msg and "(N, C)" in msg


def test_integer_outputs():
    msg = one_line_error(mse, jnp.zeros((4, 3), jnp.int32), jnp.zeros((4,), jnp.int32))
    assert "int32" in msg


def test_complex_targets():
    msg = one_line_error(mse, jnp.zeros((4, 3), jnp.float32), jnp.zeros((4, 3), jnp.complex64))
    assert "complex64" in msg


@pytest.mark.parametrize("ell", [cross_entropy, mse])
def test_more_precise_targets(x64, ell):
    msg = one_line_error(ell, jnp.zeros((4, 3), jnp.float32), jnp.full((4, 3), 1 / 3, jnp.float64))
    assert "float64" in msg and "float32" in msg and "cast" in msg


def test_mse_float_labels_for_matrix_outputs():
    msg = one_line_error(mse, jnp.zeros((6, 1), jnp.float32), jnp.zeros((6,), jnp.float32))
    assert "(6,)" in msg and "(6, 1)" in msg


def test_mse_matrix_targets_for_single_output():
    msg = one_line_error(mse, jnp.zeros((6,), jnp.float32), jnp.zeros((6, 2), jnp.float32))
    assert "(6, 2)" in msg and "(6,)" in msg


def test_mse_outputs_of_three_axes():
    msg = one_line_error(mse, jnp.zeros((2, 3, 4), jnp.float32), jnp.zeros((2, 3, 4), jnp.float32))
    assert "(2, 3, 4)" in msg


def test_shape_errors_raise_under_jit():
    msg = one_line_error(jax.jit(cross_entropy), jnp.zeros((32, 10), jnp.float32), jnp.zeros((32, 3), jnp.float32))
    assert "(32, 3)" in msg


def test_get_loss_unknown_name():
    msg = one_line_error(get_loss, "hinge")
    assert "'hinge'" in msg and "cross_entropy, mse" in msg


def test_get_loss_not_callable():
    assert "3" in one_line_error(get_loss, 3)


def test_mean_reduced_custom_loss_is_caught():
    ell = get_loss(lambda z, t: jnp.mean((z - t) ** 2))
    msg = one_line_error(jax.jit(ell), jnp.zeros((32, 2), jnp.float32), jnp.zeros((32, 2), jnp.float32))
    assert msg == "the loss returned shape () for a batch of 32; return one loss per sample, shape (32,)"


def test_custom_loss_without_batch_axis():
    ell = get_loss(lambda z, t: z)
    assert "()" in one_line_error(ell, jnp.float32(1.0), jnp.float32(1.0))


def test_output_hessian_unknown_name():
    assert "'hinge'" in one_line_error(output_hessian, "hinge", jnp.zeros((2, 3)))


def test_output_hessian_custom_loss():
    def l1(z, t):
        return jnp.sum(jnp.abs(z - t), axis=-1)

    assert "'l1'" in one_line_error(output_hessian, l1, jnp.zeros((2, 3)))


def test_output_hessian_outputs_not_2d():
    assert "(2,)" in one_line_error(output_hessian, "mse", jnp.zeros((2,)))
