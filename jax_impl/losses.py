"""Per-sample losses ell(outputs, targets) -> (B,) with checked targets, and their Hessians w.r.t. the outputs."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_impl.errors import HessianApproxError

# Shapes are static in JAX, so every check below runs once at trace time and costs nothing under jit.


def _shape(shape) -> str:
    return str(tuple(int(s) for s in shape))


def _is_integer(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.bool_)


def _outputs(what: str, logits):
    """The outputs as an array; they must be floating point."""
    logits = jnp.asarray(logits)
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise HessianApproxError(
            f"{what} outputs of dtype {logits.dtype} are not floating point",
            "pass the model's float outputs (e.g. float32 logits)")
    return logits


def _as_outputs_dtype(what: str, targets, logits):
    """Targets cast to the outputs' dtype, never losing precision.

    Integer (or bool) targets are cast as they are (one-hot or count-valued targets);
    float targets only when the cast is exact (same or lower precision), else an error.
    """
    if _is_integer(targets.dtype):
        return targets.astype(logits.dtype)
    if not jnp.issubdtype(targets.dtype, jnp.floating):
        raise HessianApproxError(f"{what} targets of dtype {targets.dtype} are not real numbers",
                                 f"pass integer or float targets (e.g. {logits.dtype})")
    if jnp.promote_types(targets.dtype, logits.dtype) != logits.dtype:
        raise HessianApproxError(
            f"{what} targets of dtype {targets.dtype} are more precise than the outputs' {logits.dtype}",
            f"cast the targets to {logits.dtype}, or the parameters (and inputs) to {targets.dtype}")
    return targets.astype(logits.dtype)


def _nan_unless_valid(loss, labels, num_classes: int):
    """``loss`` (B,) where 0 <= labels < num_classes, NaN elsewhere (label values cannot be checked at trace time)."""
    ok = (labels >= 0) & (labels < num_classes)
    return jnp.where(ok, loss, jnp.nan)


def cross_entropy(logits, targets):
    """Softmax cross-entropy per sample, with integer labels or class probabilities.

    ell_n = -Σ_c t_nc log softmax(z_n)_c; with integer labels y_n, t_n = onehot(y_n).

    Args:
      logits: (B, C) float class scores z.
      targets: either (B,) integer labels in 0..C-1 (labels outside give NaN losses:
        values cannot be checked at trace time), or (B, C) class probabilities / one-hot
        rows (float: cast to the logits' dtype if that loses no precision, else an error;
        integer or bool: cast to the logits' dtype). Rows are not checked to sum to 1.
    Returns:
      (B,) losses; their mean is ``torch.nn.CrossEntropyLoss()`` with class-index or
      class-probability targets
      (https://pytorch.org/docs/stable/generated/torch.nn.CrossEntropyLoss.html).
    Raises:
      HessianApproxError: logits not (B, C) floats, targets of another shape, or float
        targets more precise than the logits.
    """
    logits = _outputs("cross-entropy", logits)
    if logits.ndim != 2:
        raise HessianApproxError(
            f"cross-entropy outputs of shape {_shape(logits.shape)} are not (N, C) class scores",
            "reshape the model's outputs to (N, C)")
    b, c = logits.shape
    t = jnp.asarray(targets)
    logp = jax.nn.log_softmax(logits, axis=-1)
    if t.shape == (b,) and _is_integer(t.dtype):
        labels = t.astype(jnp.int32)
        nll = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
        return _nan_unless_valid(nll, labels, c)
    if t.shape == (b, c):
        return -jnp.sum(_as_outputs_dtype("cross-entropy", t, logits) * logp, axis=-1)
    raise HessianApproxError(
        f"cross-entropy targets of shape {_shape(t.shape)} and dtype {t.dtype} do not fit outputs "
        f"of shape {_shape(logits.shape)}",
        f"pass integer labels of shape ({b},) or class probabilities of shape ({b}, {c})")


def mse(logits, targets):
    """Squared error averaged over the C outputs (no factor 1/2), per sample.

    ell_n = (1/C) Σ_c (z_nc - t_nc)²: torch's ``MSELoss()`` convention (mean over all
    N*C entries), also BackPACK's (Dangel, Kunstner & Hennig, "BackPACK: Packing more
    into backprop", ICLR 2020).

    Args:
      logits: (B, C) float outputs z, or (B,) for a single output (then C = 1).
      targets: for (B, C) outputs, either (B,) integer labels in 0..C-1 (one-hot encoded
        here; labels outside give NaN losses) or (B, C) targets used as they are (one-hot
        or real-valued regression targets); for (B,) outputs, (B,) targets. Float targets
        are cast to the logits' dtype if that loses no precision, else an error; integer or
        bool targets of the outputs' full shape are values, cast to the logits' dtype.
    Returns:
      (B,) losses; their mean is ``torch.nn.MSELoss()``.
    Raises:
      HessianApproxError: logits neither (B,) nor (B, C) floats, targets of another shape,
        or float targets more precise than the logits.
    """
    logits = _outputs("mse", logits)
    t = jnp.asarray(targets)
    if logits.ndim == 1:
        if t.shape == logits.shape:
            return (logits - _as_outputs_dtype("mse", t, logits)) ** 2
        fix = f"pass targets of the outputs' shape {_shape(logits.shape)}"
    elif logits.ndim == 2:
        b, c = logits.shape
        if t.shape == (b,) and _is_integer(t.dtype):
            labels = t.astype(jnp.int32)
            sq = jnp.mean((logits - jax.nn.one_hot(labels, c, dtype=logits.dtype)) ** 2, axis=-1)
            return _nan_unless_valid(sq, labels, c)
        if t.shape == (b, c):
            return jnp.mean((logits - _as_outputs_dtype("mse", t, logits)) ** 2, axis=-1)
        fix = f"pass integer labels of shape ({b},) or targets of the outputs' shape ({b}, {c})"
    else:
        raise HessianApproxError(
            f"mse outputs of shape {_shape(logits.shape)} are neither (N,) nor (N, C)",
            "reshape the model's outputs to (N, C)")
    raise HessianApproxError(
        f"mse targets of shape {_shape(t.shape)} and dtype {t.dtype} do not fit outputs of shape "
        f"{_shape(logits.shape)}", fix)


LOSSES = {"cross_entropy": cross_entropy, "mse": mse}

_USAGE = f"choose one of {', '.join(LOSSES)}, or pass a function loss(outputs, targets) returning shape (B,)"


def _checked(loss):
    """``loss`` wrapped so that a result not of shape (B,) raises (checked at trace time)."""

    @functools.wraps(loss)
    def checked(outputs, targets):
        b_shape = jnp.shape(outputs)[:1]
        if not b_shape:
            raise HessianApproxError(
                f"the loss got outputs of shape {_shape(jnp.shape(outputs))} without a batch axis",
                "pass outputs of shape (B, ...)")
        out = loss(outputs, targets)
        if jnp.shape(out) != b_shape:
            b = b_shape[0]
            raise HessianApproxError(
                f"the loss returned shape {_shape(jnp.shape(out))} for a batch of {b}",
                f"return one loss per sample, shape ({b},)")
        return out

    checked._per_sample_checked = True
    return checked


def get_loss(loss):
    """The per-sample loss ``loss(outputs (B, ...), targets (B, ...)) -> (B,)``.

    Args:
      loss: a name from ``LOSSES`` (returns that very function, so ``get_loss("mse") is mse``),
        one of those functions (returned as is), or any callable with the signature above,
        returned wrapped so that a result not of shape (B,) (e.g. a mean-reduced loss)
        raises a one-line ``HessianApproxError`` when called or traced.
    Raises:
      HessianApproxError: an unknown name, or neither a name nor a callable.
    """
    if isinstance(loss, str):
        if loss not in LOSSES:
            raise HessianApproxError(f"loss {loss!r} is not supported", _USAGE)
        return LOSSES[loss]
    if callable(loss):
        if any(loss is f for f in LOSSES.values()) or getattr(loss, "_per_sample_checked", False):
            return loss
        return _checked(loss)
    raise HessianApproxError(f"loss {loss!r} is neither a name nor a callable", _USAGE)


def output_hessian(name: str, logits):
    """Closed-form Hessian of the per-sample loss w.r.t. the logits (independent of the targets).

    Args:
      name: ``cross_entropy`` or ``mse``.
      logits: (B, C).
    Returns:
      (B, C, C): diag(p) - p pᵀ for cross-entropy (p = softmax; targets summing to 1, as
      labels and probabilities do; in general it scales by Σ_c t_c), (2/C) I for MSE.
      See J. Martens, "New insights and perspectives on the natural gradient method",
      JMLR 21 (2020), for the cross-entropy form.
    """
    get_loss(name)  # an unknown name raises here
    if not isinstance(name, str) or name not in ("cross_entropy", "mse"):
        raise HessianApproxError(
            f"no closed-form output Hessian for loss {getattr(name, '__name__', name)!r}",
            "pass 'cross_entropy' or 'mse', or use jax.hessian of the loss")
    logits = jnp.asarray(logits)
    if logits.ndim != 2:
        raise HessianApproxError(
            f"the output Hessian needs (N, C) outputs, got shape {_shape(logits.shape)}",
            "reshape the outputs to (N, C) (a single output is (N, 1))")
    b, c = logits.shape
    if name == "cross_entropy":
        p = jax.nn.softmax(logits, axis=-1)
        return jax.vmap(jnp.diag)(p) - p[:, :, None] * p[:, None, :]
    return jnp.broadcast_to(2.0 / c * jnp.eye(c, dtype=logits.dtype), (b, c, c))
