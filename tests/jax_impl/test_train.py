"""Training: seeded and reproducible, the default MLP reaches >90% MNIST test accuracy, CNNs train on images."""

import numpy as np
import pytest

from jax_impl import data, models, train
from jax_impl.errors import HessianApproxError


def test_default_network_reaches_90_percent_on_mnist(mnist_path):
    ds = data.load_mnist_idx(mnist_path)
    spec = models.mlp(ds.x_train.shape[1])
    params, hist = train.train(spec, ds.x_train, ds.y_train, train.TrainConfig())
    acc = train.accuracy(models.make_apply(spec), params, ds.x_test, ds.y_test)
    assert acc >= 0.90, acc
    assert hist["loss"][-1] < hist["loss"][0]


def test_training_is_seeded():
    ds = data.load_digits()
    spec = models.mlp(64, (8,))
    cfg = train.TrainConfig(epochs=2, batch_size=64)
    p1, _ = train.train(spec, ds.x_train, ds.y_train, cfg)
    p2, _ = train.train(spec, ds.x_train, ds.y_train, cfg)
    p3, _ = train.train(spec, ds.x_train, ds.y_train, train.TrainConfig(epochs=2, batch_size=64, seed=1))
    f = lambda p: np.concatenate([np.ravel(v) for v in models.flatten_tree(p).values()])
    np.testing.assert_array_equal(f(p1), f(p2))
    assert not np.allclose(f(p1), f(p3))


def test_bad_settings_are_refused():
    with pytest.raises(HessianApproxError, match="learning_rate > 0"):
        train.TrainConfig(learning_rate=0)
    spec = models.mlp(5)
    with pytest.raises(HessianApproxError, match="do not fit the model's input"):
        train.train(spec, np.zeros((10, 3), np.float32), np.zeros(10, np.int32))
    r = np.random.default_rng(0)
    x, y = (r.normal(size=(64, 2)) * 1e3).astype(np.float32), r.integers(0, 10, 64).astype(np.int32)
    with pytest.raises(HessianApproxError, match="diverged"):
        train.train(models.mlp(2, (4,)), x, y,
                    train.TrainConfig(epochs=1, batch_size=8, learning_rate=1e30))
    x[3, 1] = np.nan
    with pytest.raises(HessianApproxError, match="training inputs.*NaN"):
        train.train(models.mlp(2, (4,)), x, y)


def test_a_cnn_learns_digits_from_flat_rows():
    """Flat 8x8 rows are reshaped to (8, 8, 1) images; a small CNN beats chance by far in 5 epochs."""
    ds = data.load_digits()
    arch = models.parse("conv4k3-relu-maxpool2-flatten-dense10", ds.image_shape)
    params, hist = train.train(arch, ds.x_train, ds.y_train, train.TrainConfig(epochs=5, batch_size=32, learning_rate=1e-2))
    acc = train.accuracy(models.make_apply(arch), params, ds.x_test, ds.y_test)
    assert acc > 0.8, acc  # chance is 0.1
    assert hist["loss"][-1] < hist["loss"][0]
