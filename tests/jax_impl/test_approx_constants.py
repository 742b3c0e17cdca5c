"""Captured parameters and data stay runtime values: no approximation is constant-folded.

A caller that jits a closure over the problem (``jax.jit(lambda k: kflr(problem))``, as the
bench did) makes the parameters and data compile-time constants; without a barrier XLA then
evaluates the whole approximation at compile time (a (784, 784) input factor for the MNIST
MLP: seconds of compilation, XLA's "Constant folding an instruction is taking > 1s" alarm,
and a timed "run" that only returns the stored result). The check: the optimized HLO of
the closure holds no constant beyond those of the same program with parameters and data as
arguments, plus the captured arrays themselves.
"""

import collections
import re

import jax
import numpy as np
import pytest

from jax_impl import operators
from jax_impl.approx import APPROXIMATIONS
from tests.cases import case

# One chunk (the scan has one step, which XLA unrolls: the case most open to folding);
# sizes chosen so that no factor or activation has the shape of a captured array.
N = 13
MLP, CNN = case("mlp2", "tanh", "mse"), case("cnn-avg", "sigmoid", "cross_entropy")
# One method per jitted core on the MLP: DiagH (the diagonal core, with its tanh residuals;
# DiagGGN and DiagGGN-MC run the same core), KFLR and KFAC (the square-root core, exact and
# sampled), KFRA; and KFRA on the CNN (strided padded convolution, average pooling, whose
# KFRA rule builds its own zero inputs). Without the barrier every one of these failed, and
# so did all six methods on both networks.
CASES = [(name, MLP) for name in ("diag-h", "kfac", "kflr", "kfra")] + [("kfra", CNN)]
_CONSTANT = re.compile(r"=\s*(\w+)\[([\d,]*)\](?:\{[^}]*\})?\s+constant\(")


def constants(compiled) -> collections.Counter:
    """Counter of the non-scalar constants of an optimized HLO module, as "f32[3,4]"."""
    found = (_CONSTANT.search(line) for line in compiled.as_text().splitlines())
    return collections.Counter(f"{m[1]}[{m[2]}]" for m in found if m and int(np.prod(
        [int(s) for s in m[2].split(",") if s] or [1])) > 1)


def hlo_shape(a) -> str:
    kind = {"f": "f", "i": "s", "u": "u"}[a.dtype.kind]
    return f"{kind}{8 * a.dtype.itemsize}[{','.join(map(str, a.shape))}]"


@pytest.mark.parametrize("name,c", [pytest.param(n, c, id=f"{n}-{c.id}") for n, c in CASES])
def test_captured_data_is_not_constant_folded(c, name):
    prob = c.problem("float32", chunk_size=N, n=N)
    fn, key = APPROXIMATIONS[name], jax.random.PRNGKey(0)
    closure = jax.jit(lambda k: fn(prob, c.arch, k, 2))
    as_args = jax.jit(lambda p, b, k: fn(operators.Problem(prob.apply, prob.ell, p, b), c.arch, k, 2))
    compiled = closure.lower(key).compile(), as_args.lower(prob.params, prob.batches, key).compile()
    folded, baseline = map(constants, compiled)
    captured = collections.Counter(hlo_shape(a) for a in jax.tree_util.tree_leaves((prob.params, prob.batches)))
    extra = folded - baseline - captured
    assert not extra, f"{name} on {c.id}: constants {dict(extra)} folded from the captured parameters and data"
    flat = lambda r: np.concatenate([np.ravel(a) for a in jax.tree_util.tree_leaves(r)])
    np.testing.assert_allclose(flat(compiled[0](key)), flat(compiled[1](prob.params, prob.batches, key)),
                               rtol=1e-5, atol=1e-7)
