"""bridge.external: weight files of other training scripts (torch .pt, safetensors, Flax msgpack) in the Flax layout."""

import hashlib
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch extra is not installed")

import flax.linen as fnn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import serialization  # noqa: E402
from safetensors.numpy import save_file as save_numpy  # noqa: E402
from safetensors.torch import save_file as save_torch  # noqa: E402

from bridge.convert import torch_to_flax  # noqa: E402
from bridge.external import (  # noqa: E402
    ACTIVATION_FIX, ACTIVATION_PROBLEM, CONV_FIX, CONV_PROBLEM, natural_key, read_weights,
)
from hessian_approx.architecture import mlp, parse  # noqa: E402
from hessian_approx.errors import HessianApproxError  # noqa: E402
from hessian_approx.layers import Flatten  # noqa: E402
from jax_impl import checkpoint, models  # noqa: E402
from tests.conftest import REPO  # noqa: E402
from tests.torch_ref.conftest import one_torch_thread  # noqa: E402,F401  (autouse: torch.set_num_threads(1))

nn = torch.nn


def seeded(model, seed=0):
    """``model`` in float64 with N(0, 0.5²) weights (no zeros, no ties)."""
    g = torch.Generator().manual_seed(seed)
    model = model.double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return model.eval()


def tanh_mlp():
    return seeded(nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)))


def sigmoid_mlp():
    return seeded(nn.Sequential(nn.Linear(12, 9), nn.Sigmoid(), nn.Linear(9, 7), nn.Sigmoid(), nn.Linear(7, 3)))


def small_cnn():
    """8x8x1 images: conv 6x6x4 -> pool 3x3x4 -> flatten 36 -> 5 classes."""
    return seeded(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(36, 5)))


CNN = parse("conv4k3-relu-maxpool2-flatten-dense5", (8, 8, 1))


def save(model_or_state, path):
    """torch.save or safetensors.torch.save_file, by the suffix."""
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    if path.suffix == ".safetensors":
        save_torch({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


def outputs_agree(model, params, arch, x_nhwc):
    """JAX on NHWC (flattened channels last for flat networks) against torch on NCHW, float64."""
    x = np.asarray(x_nhwc, np.float64)
    tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy() if x.ndim == 4 else x)
    with torch.no_grad():
        want = model(tx).numpy()
    got = np.asarray(models.make_apply(arch)(params, jnp.asarray(models.as_inputs(arch, x))))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def one_line_error(match, fix, **kwargs):
    """Run read_weights(**kwargs); the error must match ``match``, be one line and name ``fix``."""
    with pytest.raises(HessianApproxError, match=match) as err:
        read_weights(**kwargs)
    assert "\n" not in str(err.value) and fix in err.value.fix
    return err.value


# ---- torch files --------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_torch_mlp_with_given_arch_computes_what_torch_computes(tmp_path, x64, suffix):
    model = tanh_mlp()
    arch = mlp(64, (16,), 10, "tanh")
    params, got_arch, info = read_weights(save(model, tmp_path / f"w{suffix}"), arch=arch)
    assert got_arch == arch and info["architecture_source"] == "given"
    assert info["weights_format"] == ("torch-state-dict" if suffix == ".pt" else "torch-safetensors")
    outputs_agree(model, params, arch, np.random.default_rng(0).normal(size=(7, 64)))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("make, activation, widths", [(tanh_mlp, "tanh", (64, (16,), 10)),
                                                      (sigmoid_mlp, "sigmoid", (12, (9, 7), 3))])
def test_torch_mlp_architecture_is_inferred_from_shapes(tmp_path, x64, suffix, make, activation, widths):
    model = make()
    params, arch, info = read_weights(save(model, tmp_path / f"w{suffix}"), activation=activation)
    assert arch == mlp(*widths, activation) and info["architecture_source"] == "inferred from tensor shapes"
    outputs_agree(model, params, arch, np.random.default_rng(1).normal(size=(5, widths[0])))


def test_info_names_the_file_and_its_sha256(tmp_path):
    path = save(tanh_mlp(), tmp_path / "w.pt")
    _, _, info = read_weights(path, activation="tanh")
    assert info["weights_file"] == str(path)
    assert info["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_flatten_first_mlp_on_one_channel_images_is_the_mlp_preset(tmp_path, x64):
    model = seeded(nn.Sequential(nn.Flatten(), nn.Linear(64, 6), nn.ReLU(), nn.Linear(6, 3)))
    params, arch, _ = read_weights(save(model, tmp_path / "w.pt"), input_shape=(8, 8, 1), activation="relu")
    assert arch == parse("dense6-relu-dense3", (8, 8, 1)) and arch.input_shape == (64,)
    outputs_agree(model, params, arch, np.random.default_rng(2).normal(size=(4, 8, 8, 1)))


def test_flatten_first_mlp_on_color_images_permutes_to_channels_last(tmp_path, x64):
    model = seeded(nn.Sequential(nn.Flatten(), nn.Linear(48, 6), nn.ReLU(), nn.Linear(6, 3)))
    params, arch, _ = read_weights(save(model, tmp_path / "w.pt"), input_shape=(4, 4, 3), activation="relu")
    assert arch.input_shape == (4, 4, 3) and isinstance(arch.layers[0], Flatten)
    outputs_agree(model, params, arch, np.random.default_rng(3).normal(size=(4, 4, 4, 3)))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_torch_cnn_with_given_arch_computes_what_torch_computes(tmp_path, x64, suffix):
    model = small_cnn()
    params, arch, _ = read_weights(save(model, tmp_path / f"w{suffix}"), arch=CNN)
    assert arch == CNN
    outputs_agree(model, params, arch, np.random.default_rng(4).normal(size=(6, 8, 8, 1)))


def test_layer_string_with_input_shape_is_parsed(tmp_path, x64):
    model = small_cnn()
    params, arch, info = read_weights(save(model, tmp_path / "w.pt"), arch="conv4k3-relu-maxpool2-flatten-dense5",
                                      input_shape=(8, 8, 1))
    assert arch == CNN and info["architecture_source"] == "given"


def test_layer_string_of_a_dense_network_takes_the_input_width_from_the_file(tmp_path):
    _, arch, _ = read_weights(save(tanh_mlp(), tmp_path / "w.pt"), arch="dense16-tanh-dense10")
    assert arch == mlp(64, (16,), 10, "tanh")


@pytest.mark.parametrize("key", ["state_dict", "model_state_dict"])
def test_training_checkpoint_dict_holding_the_state_dict(tmp_path, x64, key):
    model = tanh_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.save({"epoch": 3, key: model.state_dict(), "optimizer_state_dict": opt.state_dict()}, tmp_path / "c.pth")
    params, arch, _ = read_weights(tmp_path / "c.pth", activation="tanh")
    outputs_agree(model, params, arch, np.random.default_rng(5).normal(size=(3, 64)))


def test_pt_file_keeps_registration_order_not_name_order(tmp_path, x64):
    class Net(nn.Module):  # registered z then a: name order would put the output layer first
        def __init__(self):
            super().__init__()
            self.z_in = nn.Linear(5, 4)
            self.a_out = nn.Linear(4, 2)

        def forward(self, x):
            return self.a_out(torch.tanh(self.z_in(x)))

    model = seeded(Net())
    params, arch, _ = read_weights(save(model, tmp_path / "w.pt"), activation="tanh")
    assert arch == mlp(5, (4,), 2, "tanh")
    outputs_agree(model, params, arch, np.random.default_rng(6).normal(size=(3, 5)))


def test_safetensors_orders_sequential_indices_as_numbers(tmp_path, x64):
    widths = [3, 4, 5, 6, 7, 8, 2]  # six Linear layers at indices 0, 2, ..., 10: "10" sorts before "2" as text
    layers = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    model = seeded(nn.Sequential(*layers[:-1]))
    params, arch, _ = read_weights(save(model, tmp_path / "w.safetensors"), activation="tanh")
    assert arch == mlp(3, tuple(widths[1:-1]), 2, "tanh")
    outputs_agree(model, params, arch, np.random.default_rng(7).normal(size=(3, 3)))


def test_natural_key_compares_numbers_as_numbers():
    names = ["net.10", "net.2", "Dense_10", "Dense_9", "fc1", "fc12", "fc2"]
    assert sorted(names, key=natural_key) == ["Dense_9", "Dense_10", "fc1", "fc2", "fc12", "net.2", "net.10"]


def test_torch_to_flax_output_feeds_unflatten_tree(x64):
    model = small_cnn()
    params = models.unflatten_tree(torch_to_flax(model.state_dict(), CNN))
    assert all(isinstance(v, jax.Array) for leaves in params.values() for v in leaves.values())
    outputs_agree(model, params, CNN, np.random.default_rng(8).normal(size=(2, 8, 8, 1)))


# ---- Flax files ---------------------------------------------------------------------------


def flax_writers():
    """name -> (write(params, path), suffix): the Flax file forms read_weights accepts."""
    def msgpack(params, path):
        path.write_bytes(serialization.to_bytes({"params": params}))

    def joined(sep, outer):
        def write(params, path):
            flat = {sep.join([*outer, layer, leaf]): np.ascontiguousarray(np.asarray(v))
                    for layer, leaves in params.items() for leaf, v in leaves.items()}
            save_numpy(flat, str(path))
        return write

    return {"msgpack": (msgpack, ".msgpack"), "dots": (joined(".", ["params"]), ".safetensors"),
            "slashes": (joined("/", []), ".safetensors")}


FORMAT_OF = {"msgpack": "flax-msgpack", "dots": "flax-safetensors", "slashes": "flax-safetensors"}


def assert_same_tree(got, want):
    assert set(got) == set(want)
    for layer in want:
        assert set(got[layer]) == {"kernel", "bias"}
        for leaf in ("kernel", "bias"):
            assert np.array_equal(got[layer][leaf], np.asarray(want[layer][leaf]))
            assert got[layer][leaf].dtype == np.asarray(want[layer][leaf]).dtype


@pytest.mark.parametrize("form", ["msgpack", "dots", "slashes"])
def test_flax_init_params_read_back_equal(tmp_path, form):
    params = models.init_params(CNN, jax.random.PRNGKey(0))
    write, suffix = flax_writers()[form]
    write(params, tmp_path / f"p{suffix}")
    got, arch, info = read_weights(tmp_path / f"p{suffix}", arch=CNN)
    assert arch == CNN and info["weights_format"] == FORMAT_OF[form]
    assert_same_tree(got, params)


class UserMLP(fnn.Module):
    """A researcher's own Flax module with chosen layer names."""

    @fnn.compact
    def __call__(self, x):
        x = fnn.tanh(fnn.Dense(16, name="hidden")(x))
        return fnn.Dense(10, name="out")(x)


@pytest.mark.parametrize("form", ["msgpack", "dots", "slashes"])
def test_user_flax_module_with_custom_names_reads_as_dense_layers(tmp_path, x64, form):
    x = np.random.default_rng(9).normal(size=(4, 64))
    variables = UserMLP().init(jax.random.PRNGKey(1), jnp.zeros((1, 64)))
    write, suffix = flax_writers()[form]
    write(variables["params"], tmp_path / f"p{suffix}")
    got, arch, _ = read_weights(tmp_path / f"p{suffix}", activation="tanh")
    assert arch == mlp(64, (16,), 10, "tanh")
    assert_same_tree(got, {"Dense_0": variables["params"]["hidden"], "Dense_1": variables["params"]["out"]})
    np.testing.assert_allclose(models.make_apply(arch)(got, x), UserMLP().apply(variables, x), rtol=1e-6, atol=1e-6)


def test_flax_auto_names_past_ten_are_ordered_by_number(tmp_path):
    arch = mlp(3, (4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14), 2, "relu")  # Dense_0 ... Dense_11
    r = np.random.default_rng(2)
    params = {p.name: {leaf: r.normal(size=s).astype(np.float32) for leaf, s in p.shapes.items()}
              for p in sorted(arch.param_layers, key=lambda p: p.name)}  # as after jax.tree.map: names sorted as text
    assert list(params)[:3] == ["Dense_0", "Dense_1", "Dense_10"]
    (tmp_path / "p.msgpack").write_bytes(serialization.to_bytes(params))
    got, inferred, _ = read_weights(tmp_path / "p.msgpack", activation="relu")
    assert inferred == arch
    assert_same_tree(got, params)


def test_flax_train_state_keeps_params_and_drops_optimizer(tmp_path):
    arch = mlp(4, (3,), 2, "relu")
    params = models.init_params(arch, jax.random.PRNGKey(3))
    (tmp_path / "s.msgpack").write_bytes(serialization.to_bytes({"step": 7, "params": params,
                                                                 "opt_state": {"mu": params}}))
    got, _, _ = read_weights(tmp_path / "s.msgpack", arch=arch)
    assert_same_tree(got, params)


# ---- the project's own files --------------------------------------------------------------


def test_project_file_is_read_with_its_own_architecture(tmp_path):
    params = models.init_params(CNN, jax.random.PRNGKey(4))
    checkpoint.save_checkpoint(tmp_path / "m.safetensors", params, CNN, {"seed": 4})
    got, arch, info = read_weights(tmp_path / "m.safetensors", arch=CNN)
    assert arch == CNN and info["weights_format"] == "hessian-approx"
    assert info["architecture_source"] == "file metadata"
    assert_same_tree(got, params)


def test_project_file_refuses_a_different_given_architecture(tmp_path):
    checkpoint.save_checkpoint(tmp_path / "m.safetensors", models.init_params(CNN, jax.random.PRNGKey(4)), CNN)
    one_line_error(r"holds 8x8x1 conv4k3-relu-maxpool2-flatten-dense5 but arch= is 8x8x1 conv4k3-tanh",
                   "leave out arch=", path=tmp_path / "m.safetensors", arch="conv4k3-tanh-maxpool2-flatten-dense5",
                   input_shape=(8, 8, 1))


def test_checkpoint_loader_points_foreign_safetensors_to_weights(tmp_path):
    path = save(tanh_mlp(), tmp_path / "w.safetensors")
    from bridge.weights import read_flax_file

    for load in (checkpoint.load_checkpoint, read_flax_file):
        with pytest.raises(HessianApproxError, match="no architecture") as err:
            load(path)
        assert "\n" not in str(err.value) and "--weights FILE" in err.value.fix and "read_weights" in err.value.fix


def test_module_imports_neither_jax_torch_nor_flax():
    code = ("import sys, bridge.external; "
            "print(sorted(m for m in ('jax', 'torch', 'flax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---- errors: one line, naming the fix -------------------------------------------------------


def test_convolutions_are_not_inferred(tmp_path):
    err = one_line_error(CONV_PROBLEM, "--arch", path=save(small_cnn(), tmp_path / "w.pt"))
    assert str(err) == f"{CONV_PROBLEM}; {CONV_FIX}"


def test_inference_without_activation_asks_for_it(tmp_path):
    err = one_line_error(ACTIVATION_PROBLEM, "--activation relu|tanh|sigmoid", path=save(tanh_mlp(), tmp_path / "w.pt"))
    assert str(err) == f"{ACTIVATION_PROBLEM}; {ACTIVATION_FIX}"


def test_single_dense_layer_needs_no_activation(tmp_path):
    _, arch, _ = read_weights(save(seeded(nn.Sequential(nn.Linear(6, 3))), tmp_path / "w.pt"))
    assert arch == mlp(6, (), 3)


def test_bare_linear_state_dict_without_module_path(tmp_path, x64):
    model = seeded(nn.Linear(6, 3))  # keys "weight", "bias"
    params, arch, _ = read_weights(save(model, tmp_path / "w.pt"))
    assert arch == mlp(6, (), 3)
    outputs_agree(model, params, arch, np.random.default_rng(10).normal(size=(2, 6)))


def test_layer_string_of_a_conv_network_needs_input_shape(tmp_path):
    one_line_error(r"layer string 'conv4k3-relu-maxpool2-flatten-dense5' does not give the input shape",
                   "input_shape=", path=save(small_cnn(), tmp_path / "w.pt"),
                   arch="conv4k3-relu-maxpool2-flatten-dense5")


@pytest.mark.parametrize("layers, match", [
    ([nn.Linear(4, 3), nn.Linear(3, 2)], r"'0' and '1' have no module between them"),
    ([nn.Linear(4, 3), nn.ReLU(), nn.Dropout(), nn.Linear(3, 2)], r"'0' and '3' have 2 modules between them"),
    ([nn.Flatten(), nn.Dropout(), nn.Linear(4, 3)], r"'2' has 2 modules before it"),
])
def test_ambiguous_sequential_gaps_are_refused(tmp_path, layers, match):
    one_line_error(match, "arch=", path=save(seeded(nn.Sequential(*layers)), tmp_path / "w.pt"), activation="relu")


def test_widths_that_do_not_chain_are_refused(tmp_path):
    state = {"0.weight": torch.ones(16, 64), "0.bias": torch.ones(16), "2.weight": torch.ones(10, 15),
             "2.bias": torch.ones(10)}
    one_line_error(r"'2.weight' takes 15 inputs but '0.weight' before it gives 16", "arch=",
                   path=save(state, tmp_path / "w.pt"), activation="relu")


def test_input_shape_of_another_size_is_refused(tmp_path):
    one_line_error(r"input_shape \(28, 28, 1\) holds 784 values .* '0.weight' takes 64", "per-sample shape",
                   path=save(tanh_mlp(), tmp_path / "w.pt"), activation="tanh", input_shape=(28, 28, 1))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_wrong_shape_names_tensor_shape_and_expected(tmp_path, suffix):
    one_line_error(r"tensor '0.weight' has shape \(16, 64\), expected \(12, 64\) for Dense_0/kernel", "--arch",
                   path=save(tanh_mlp(), tmp_path / f"w{suffix}"), arch=mlp(64, (12,), 10, "tanh"))


def test_wrong_flax_shape_names_the_tensor(tmp_path):
    params = models.init_params(mlp(5, (4,), 2), jax.random.PRNGKey(5))
    flax_writers()["dots"][0](params, tmp_path / "p.safetensors")
    one_line_error(r"tensor 'params.Dense_0.kernel' has shape \(5, 4\), expected \(5, 3\)", "--arch",
                   path=tmp_path / "p.safetensors", arch=mlp(5, (3,), 2))


def test_extra_layer_is_named(tmp_path):
    one_line_error(r"holds tensors '2.weight', '2.bias' beyond the 1 layers", "--arch",
                   path=save(tanh_mlp(), tmp_path / "w.pt"), arch=mlp(64, (), 16))


def test_missing_layer_is_named(tmp_path):
    one_line_error(r"no tensors for layer Dense_2 .* \(expected weight \(12, 10\) and bias \(12,\)\)", "--arch",
                   path=save(tanh_mlp(), tmp_path / "w.pt"), arch=mlp(64, (16, 10), 12, "tanh"))


def test_flax_layer_name_the_architecture_lacks_is_named(tmp_path):
    params = models.init_params(mlp(5, (4, 3), 2), jax.random.PRNGKey(6))
    (tmp_path / "p.msgpack").write_bytes(serialization.to_bytes(params))
    one_line_error(r"holds layer 'Dense_2', which 5 dense4-relu-dense2 lacks", "--arch",
                   path=tmp_path / "p.msgpack", arch=mlp(5, (4,), 2))


def test_tensor_that_is_no_weight_or_bias_is_named(tmp_path):
    model = seeded(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 2)))
    one_line_error(r"tensor '1.running_mean', which is not the weight or bias", "Linear/Conv2d",
                   path=save(model, tmp_path / "w.pt"), activation="relu")


def test_missing_bias_is_named(tmp_path):
    model = seeded(nn.Sequential(nn.Linear(4, 3, bias=False), nn.ReLU(), nn.Linear(3, 2)))
    one_line_error(r"holds '0.weight' but no bias of layer '0'", "bias=True",
                   path=save(model, tmp_path / "w.pt"), activation="relu")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_mixed_dtypes_name_both_tensors(tmp_path, suffix):
    state = {k: v.float() if k == "2.weight" else v for k, v in tanh_mlp().state_dict().items()}
    one_line_error(r"tensor '0\.\w+' is float64 but '2.weight' is float32", "one dtype",
                   path=save(state, tmp_path / f"w{suffix}"), activation="tanh")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_integer_tensor_is_refused(tmp_path, suffix):
    state = {**tanh_mlp().state_dict(), "0.bias": torch.arange(16, dtype=torch.int32)}
    one_line_error(r"'0.bias' has dtype (int32|I32)", "float32 or float64",
                   path=save(state, tmp_path / f"w{suffix}"), activation="tanh")


def test_bfloat16_is_refused_not_cast(tmp_path):
    one_line_error(r"'0.weight' is bfloat16", "float32", path=save(tanh_mlp().bfloat16(), tmp_path / "w.pt"),
                   activation="tanh")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_nan_is_refused(tmp_path, suffix):
    state = tanh_mlp().state_dict()
    state["2.bias"][3] = float("nan")
    one_line_error(r"2.bias .*NaN or Inf", "finite", path=save(state, tmp_path / f"w{suffix}"), activation="tanh")


def test_missing_file(tmp_path):
    one_line_error("does not exist", "--weights", path=tmp_path / "none.pt")


def test_directory_is_not_a_file(tmp_path):
    one_line_error("is not a file", "--weights", path=tmp_path)


@pytest.mark.parametrize("content, match", [(b"", "is empty"), (b"hello, weights\n" * 4, "unknown format")])
def test_unknown_format(tmp_path, content, match):
    (tmp_path / "w.bin").write_bytes(content)
    one_line_error(match, "torch.save(model.state_dict(), path)", path=tmp_path / "w.bin")


def test_pickled_module_is_refused_by_weights_only(tmp_path):
    torch.save(tanh_mlp(), tmp_path / "m.pt")  # the whole module, not its state_dict
    one_line_error(r"torch.load\(weights_only=True\) accepts", "model.state_dict()", path=tmp_path / "m.pt")


def test_truncated_safetensors_is_refused(tmp_path):
    path = save(tanh_mlp(), tmp_path / "w.safetensors")
    path.write_bytes(path.read_bytes()[:-100])
    one_line_error("not a readable safetensors file", "save_file", path=path)


def test_corrupt_msgpack_is_refused(tmp_path):
    (tmp_path / "p.msgpack").write_bytes(b"\x82\xa6params\xc1\xc1\xc1")
    one_line_error("not readable Flax msgpack", "to_bytes", path=tmp_path / "p.msgpack")
