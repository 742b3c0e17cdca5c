"""dense(): columns of any matvec, chunking with padding, and the memory refusal."""

import jax.numpy as jnp
import numpy as np
import pytest

from jax_impl.errors import HessianApproxError
from jax_impl.algorithms import as_operator
from jax_impl.materialize import check_fits, dense, dense_bytes


@pytest.mark.parametrize("chunk", [1, 4, 7, 50])
def test_dense_recovers_matrix(chunk, rng, x64):
    a = rng.normal(size=(13, 13))  # not symmetric: checks columns are not transposed
    got = dense(as_operator(jnp.asarray(a)), chunk_size=chunk)
    np.testing.assert_array_equal(got, a)


def test_progress_reports_columns(rng, x64):
    seen = []
    dense(as_operator(lambda v: v, dim=10, dtype=jnp.float64), chunk_size=4, progress=seen.append)
    assert seen == [4, 8, 10]


def test_refuses_when_it_will_not_fit():
    need = dense_bytes(10_000, np.float32, 256)
    with pytest.raises(HessianApproxError) as err:
        dense(as_operator(lambda v: v, dim=10_000, dtype=jnp.float32), available=need // 2)
    msg = str(err.value)
    assert "GiB" in msg and "10000x10000" in msg and "lanczos" in msg and "\n" not in msg
    check_fits(10_000, np.float32, 256, available=need)  # exactly enough passes
