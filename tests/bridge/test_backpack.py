"""BackPACK 1.7.1 on the torch twin, converted by bridge.backpack, against exact JAX curvature (float64).

Independent of jax_impl.approx: the references are the dense GGN and Hessian materialized
from ``jax_impl.operators`` matrix-vector products. Tolerances:

- RTOL = 1e-10, relative to the largest entry, for quantities BackPACK computes exactly
  (DiagGGN, DiagHessian, the KFLR/KFRA blocks that are exact by the identities below):
  both sides are float64 sums of the same terms in different orders, seen to agree to
  ~1e-15; 1e-10 leaves room for the conditioning of sigmoid/tanh chains, and a wrong
  permutation or scale shows as O(1).
- Monte-Carlo methods: the mean of S seeded BackPACK draws lies within Z standard errors
  (estimated from the draws) of the exact expectation, entrywise.

Identities used (derived in bridge/backpack.py's docstring):
- KFLR's G of every layer is the exact GGN bias block (conv: BackPACK sums the backpropagated
  square root over output locations, which is the bias Jacobian).
- With one sample, a Dense layer's KFLR kernel block kron(A, G) is the exact GGN block, and so
  is a conv's when it has one output location; with one sample KFRA equals KFLR.
"""

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch extra is not installed")
pytest.importorskip("backpack", reason="the torch extra (BackPACK) is not installed")

from bridge.backpack import input_factor_to_flax, kernel_rows, to_diagonal, to_kronecker, to_structure  # noqa: E402
from bridge.convert import load_into_torch  # noqa: E402
from bridge.permutation import kernel_permutation, param_slices  # noqa: E402
from hessian_approx.architecture import parse  # noqa: E402
from hessian_approx.errors import HessianApproxError  # noqa: E402
from jax_impl import materialize, operators  # noqa: E402
from tests.cases import CASES, CASES_ALL, Case, case, params  # noqa: E402
from torch_ref.backpack_runner import run_backpack, standard_strides  # noqa: E402
from torch_ref.models import build_twin  # noqa: E402

pytestmark = pytest.mark.usefixtures("x64")  # float64 throughout

RTOL = 1e-10
Z = 5.0  # per-entry z bound; ~300 entries -> false alarm ~2e-4 under the null
S = 160  # Monte-Carlo repetitions


@pytest.fixture(autouse=True)
def float64_one_thread():
    """float64 default dtype and one torch thread (2 shared cores); both restored."""
    old, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    yield
    torch.set_default_dtype(old)
    torch.set_num_threads(threads)


def rel(a, b) -> float:
    """max |a - b| / max |b|."""
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@dataclasses.dataclass(frozen=True)
class OneLocation(Case):
    """A conv with a single output location (3x3 kernel on a 3x3 image) feeding a Dense layer."""

    @property
    def arch(self):
        return parse(f"conv3k3-{self.activation}-flatten-dense3", (3, 3, 2))


@functools.lru_cache(maxsize=None)
def twin(c: Case):
    """(arch, JAX problem, float64 torch twin with the same weights, x, y) of a case."""
    arch, prob = c.arch, c.problem()
    x, y = c.data()
    model = build_twin(arch, torch.float64)
    load_into_torch(model, prob.params, arch)
    return arch, prob, model, x, y


@functools.lru_cache(maxsize=None)
def exact(c: Case, which: str) -> np.ndarray:
    """The dense (d, d) GGN ("ggn") or Hessian ("hessian") of a case, JAX flat order."""
    prob = twin(c)[1]
    mv = operators.ggn_vp(prob) if which == "ggn" else operators.hvp(prob)
    return materialize.dense(mv)


def backpack(c: Case, method: str, **kw):
    """BackPACK's ``method`` on the case's twin, converted to a JAX structure."""
    arch, _, model, x, y = twin(c)
    return to_structure(run_backpack(model, x, y, c.loss, method, **kw), arch, method)


def blocks(c: Case, leaf: str):
    """[(Flax name, slice of ``name/leaf`` in the JAX flat order)] in network order."""
    slices = param_slices(c.arch, "jax")
    return [(p.name, slices[f"{p.name}/{leaf}"]) for p in c.arch.param_layers]


# ---- exact quantities ------------------------------------------------------------------
@pytest.mark.parametrize("c", params())
def test_diagonals_match_exact_ggn_and_hessian(c):
    assert rel(backpack(c, "diag-ggn").diag, np.diag(exact(c, "ggn"))) < RTOL
    assert rel(backpack(c, "diag-h").diag, np.diag(exact(c, "hessian"))) < RTOL


@pytest.mark.parametrize("c", params())
def test_kflr_bias_factor_is_the_exact_ggn_bias_block(c):
    ggn, kflr = exact(c, "ggn"), backpack(c, "kflr")
    for name, sl in blocks(c, "bias"):
        assert rel(kflr.block(name, "bias"), ggn[sl, sl]) < RTOL, name


SINGLE = [case(a, act, loss, n=1) for a in ("cnn-max", "cnn-avg", "cnn-same")
          for act, loss in (("relu", "cross_entropy"), ("tanh", "mse"), ("sigmoid", "cross_entropy"))]
ONE_LOCATION = [OneLocation("one-location", act, loss, n=1) for act in ("relu", "tanh", "sigmoid")
                for loss in ("cross_entropy", "mse")]


@pytest.mark.parametrize("c", params(SINGLE + ONE_LOCATION))
def test_single_sample_kflr_blocks_are_exact_and_kfra_equals_kflr(c):
    """N = 1: Dense kernel blocks (NHWC rows after the Flatten) and one-location conv kernel
    blocks of KFLR are exact GGN blocks; KFRA's factors equal KFLR's."""
    ggn, kflr, kfra = exact(c, "ggn"), backpack(c, "kflr"), backpack(c, "kfra")
    convs = {p.name for p in c.arch.param_layers if p.layer.kind == "conv2d"}
    one_location = {p.name for p in c.arch.param_layers if np.prod(p.out_shape[:-1]) == 1}
    for name, sl in blocks(c, "kernel"):
        if name not in convs or name in one_location:
            assert rel(kflr.block(name, "kernel"), ggn[sl, sl]) < RTOL, name
    assert isinstance(c, OneLocation) or convs - one_location  # the registry cases keep a true conv
    for g, a, g2, a2 in zip(kflr.G, kflr.A, kfra.G, kfra.A):
        assert rel(g2, g) < RTOL and rel(a2, a) < RTOL


def patch_covariance(x, p) -> np.ndarray:
    """(1/N) Σ_n Σ_t u_{n,t} u_{n,t}ᵀ of the zero-padded patches u (kh·kw·in,) of a first conv, (kh, kw, in) order."""
    layer, n = p.layer, len(x)
    (ph, pw), (kh, kw), (sh, sw) = layer.pads(p.in_shape), layer.kernel, layer.stride
    xp = np.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    u = np.stack([xp[:, i * sh:i * sh + kh, j * sw:j * sw + kw, :].reshape(n, -1)
                  for i in range(p.out_shape[0]) for j in range(p.out_shape[1])], axis=1)
    return np.einsum("ntr,nts->rs", u, u) / n


@pytest.mark.parametrize("c", params([case("cnn-max", "tanh"), case("cnn-avg", "relu", "mse"), case("cnn-same", "sigmoid")]))
def test_conv_input_factor_is_the_summed_patch_covariance(c):
    """A of the first conv (valid; stride 2 with padding 1; SAME) in the Flax (kh, kw, in) order."""
    x = twin(c)[3]
    p = c.arch.param_layers[0]
    expected = patch_covariance(x, p)
    for method in ("kflr", "kfra", "kfac"):
        assert rel(backpack(c, method).A[0], expected) < RTOL, method


# ---- Monte-Carlo methods in expectation -----------------------------------------------
def _mean_se(draws):
    draws = np.asarray(draws)
    return draws.mean(0), draws.std(0, ddof=1) / np.sqrt(len(draws))


@pytest.mark.parametrize("c", params([case("cnn-max", "relu"), case("cnn-avg", "tanh", "mse"),
                                      case("cnn-same", "sigmoid"), case("mlp2", "tanh", "mse")]))
def test_monte_carlo_methods_are_unbiased(c):
    """Mean of S draws within Z standard errors of the exact DiagGGN (DiagGGN-MC) and of
    KFLR's G (KFAC's G); KFAC's A equals KFLR's (it involves no sampling)."""
    arch, _, model, x, y = twin(c)
    m = 2
    diag = [to_diagonal(run_backpack(model, x, y, c.loss, "diag-ggn-mc", m, seed=s), arch).diag for s in range(S)]
    mean, se = _mean_se(diag)
    assert np.all(np.abs(mean - np.diag(exact(c, "ggn"))) <= Z * se + 1e-12)
    kflr = backpack(c, "kflr")
    draws = [to_kronecker(run_backpack(model, x, y, c.loss, "kfac", m, seed=s), arch) for s in range(S)]
    mean, se = _mean_se([np.concatenate([np.ravel(g) for g in k.G]) for k in draws])
    assert np.all(np.abs(mean - np.concatenate([np.ravel(g) for g in kflr.G])) <= Z * se + 1e-12)
    for a, b in zip(draws[0].A, kflr.A):
        assert rel(a, b) < RTOL


# ---- the runner ------------------------------------------------------------------------
def test_runner_output_format_for_a_cnn():
    c = case("cnn-max", "tanh", "mse")  # conv(0) act maxpool conv(3) act flatten dense(6)
    _, _, model, x, y = twin(c)
    d = run_backpack(model, x, y, "mse", "diag-h")
    assert set(d) == {"0.weight", "0.bias", "3.weight", "3.bias", "6.weight", "6.bias", "seconds"}
    assert d["0.weight"].shape == (3, 2, 3, 3) and d["3.weight"].shape == (4, 3, 2, 2)
    assert d["6.weight"].shape == (3, 4) and d["0.bias"].shape == (3,) and d["seconds"] > 0
    k = run_backpack(model, x, y, "mse", "kfra")
    assert [f.shape for f in k["0.weight"]] == [(3, 3), (18, 18)] and [f.shape for f in k["0.bias"]] == [(3, 3)]
    assert [f.shape for f in k["3.weight"]] == [(4, 4), (12, 12)]
    with pytest.raises(HessianApproxError, match="not known"):
        run_backpack(model, x, y, "mse", "kfoo")
    assert torch.get_default_dtype() == torch.float64  # restored by the runner


def test_runner_refuses_unsupported_layers():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    with pytest.raises(HessianApproxError, match="layer 1 is a BatchNorm1d"):
        run_backpack(model, np.zeros((2, 3)), np.zeros(2, int), "mse", "kflr")


def test_runner_keeps_float64_under_float32_default():
    """KFRA through MaxPool2d (scatter buffer) and MSE (2*eye(C)) use the default dtype; the runner pins it."""
    c = case("cnn-max", "sigmoid", "mse")
    arch, _, model, x, y = twin(c)
    expected = to_kronecker(run_backpack(model, x, y, "mse", "kfra"), arch)
    torch.set_default_dtype(torch.float32)
    res = run_backpack(model, x, y, "mse", "kfra")
    assert torch.get_default_dtype() == torch.float32
    assert res["0.weight"][0].dtype == np.float64
    assert rel(to_kronecker(res, arch).dense(), expected.dense()) == 0.0


def test_standard_strides_fix_one_channel_channels_last_tensors():
    nhwc = torch.arange(2 * 5 * 5, dtype=torch.float64).reshape(2, 5, 5, 1)
    odd = nhwc.permute(0, 3, 1, 2).contiguous()  # still channels-last strides: (25, 1, 5, 1)
    assert odd.stride() == (25, 1, 5, 1)
    fixed = standard_strides(odd)
    assert fixed.stride() == (25, 25, 5, 1) and torch.equal(fixed, odd)
    assert standard_strides(fixed) is fixed


# ---- the conversion --------------------------------------------------------------------
def test_kernel_rows_conv_and_dense_after_flatten():
    arch = parse("conv2k2x3-relu-flatten-dense3", (4, 5, 3))  # conv out (3, 3, 2)
    conv, dense = arch.param_layers
    # Flax row (i, j, c) of the (2, 3, 3) kernel window is torch row (c, i, j)
    expected = [c * 6 + i * 3 + j for i in range(2) for j in range(3) for c in range(3)]
    assert kernel_rows(conv).tolist() == expected
    expected = [c * 9 + h * 3 + w for h in range(3) for w in range(3) for c in range(2)]
    assert kernel_rows(dense).tolist() == expected


@pytest.mark.parametrize("c", params([case("cnn-max"), case("cnn-avg"), case("cnn-same"), case("mlp2")]))
def test_kronecker_blocks_agree_with_the_flat_permutation(c):
    """kron(G, A) in torch's weight order is the JAX kernel block, moved by bridge.permutation."""
    arch, _, model, x, y = twin(c)
    res = run_backpack(model, x, y, c.loss, "kflr")
    k = to_kronecker(res, arch)
    for p in arch.param_layers:
        g, a = res[f"{p.index}.weight"]
        perm = kernel_permutation(arch, p.name)
        assert rel(np.asarray(k.block(p.name, "kernel"))[np.ix_(perm, perm)], np.kron(g, a)) == 0.0
        assert np.array_equal(input_factor_to_flax(a, p), np.asarray(k.A[arch.param_layers.index(p)]))


def test_conversion_refuses_mismatched_results():
    c = case("cnn-max")
    arch, _, model, x, y = twin(c)
    diag = run_backpack(model, x, y, c.loss, "diag-ggn")
    with pytest.raises(HessianApproxError, match="shape"):
        to_diagonal(diag, parse("conv3k3-relu-maxpool2-conv4k2-relu-flatten-dense3", (7, 7, 3)))
    with pytest.raises(HessianApproxError, match="lacks '7.weight'"):
        to_diagonal(diag, parse("conv3k3-relu-maxpool2-conv4k2-relu-flatten-relu-dense3", (7, 7, 2)))
    kron = run_backpack(model, x, y, c.loss, "kflr")
    with pytest.raises(HessianApproxError, match="not \\[G, A\\]"):
        to_kronecker(diag, arch)
    kron["3.bias"] = [2.0 * kron["3.bias"][0]]
    with pytest.raises(HessianApproxError, match="bias factor of layer 3 \\(Conv_1\\)"):
        to_kronecker(kron, arch)
    with pytest.raises(HessianApproxError, match="not known"):
        to_structure(diag, arch, "kfoo")


def test_all_registry_cases_covered():
    """The dense-matrix tests (``params()``: the registry's CASES) cover conv, both pools, flatten and
    dense, every architecture with every activation, and every architecture with both losses."""
    kinds = {l.kind for c in CASES for l in c.arch.layers}
    assert {"conv2d", "maxpool2d", "avgpool2d", "flatten", "dense"} <= kinds
    assert {(c.arch_name, c.activation) for c in CASES} == {(c.arch_name, c.activation) for c in CASES_ALL}
    assert {(c.arch_name, c.loss) for c in CASES} == {(c.arch_name, c.loss) for c in CASES_ALL}
