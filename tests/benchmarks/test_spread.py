"""--hessian-samples all, --stream and --batch-size end to end on the 8x8 digits, and their one-line errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from benchmarks.cli import main
from benchmarks.schema import validate
from benchmarks.spread import plan_spread, summarize

SMALL = ["--dataset", "digits", "--hidden", "6", "--epochs", "3"]


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "w.safetensors"
    assert main(["train", *SMALL, "--out", str(path)]) == 0
    return path


def test_all_samples_streamed_equal_in_memory(capsys, tmp_path, ckpt):
    """float32 as it runs: the same chunks in the same order, so the same numbers (module docstring of
    tests/jax_impl/test_streaming.py); 1e-5 relative allows XLA another fusion of the loop body."""
    recs = {}
    for stream in ("on", "off"):
        js = tmp_path / f"{stream}.json"
        code, _, err = run(capsys, "eigs", *SMALL, "--checkpoint", str(ckpt), "--hessian-samples", "all",
                           "--stream", stream, "--methods", "lanczos,hutchinson", "-k", "3",
                           "--hutchinson-samples", "8", "--json", str(js))
        assert code == 0, err
        recs[stream] = json.loads(js.read_text())
        validate(recs[stream])
        prov = recs[stream]["provenance"]
        assert prov["hessian_samples"] == 1500 == prov["train_size"] and prov["streamed"] == (stream == "on")
    on, off = recs["on"]["results"], recs["off"]["results"]
    np.testing.assert_allclose(on["lanczos"]["eigenvalues"], off["lanczos"]["eigenvalues"], rtol=1e-5)
    np.testing.assert_allclose(on["hutchinson"]["trace"], off["hutchinson"]["trace"], rtol=1e-5)
    np.testing.assert_allclose(recs["on"]["point"]["loss"], recs["off"]["point"]["loss"], rtol=1e-6)


def test_spread_over_batches_against_jax_hessian(capsys, tmp_path, ckpt, x64):
    """Each batch's λ_max and trace against jax.hessian of that batch's loss in float64."""
    js = tmp_path / "s.json"
    code, out, err = run(capsys, "eigs", *SMALL, "--checkpoint", str(ckpt), "--dtype", "float64", "-k", "2",
                         "--hessian-samples", "300", "--methods", "exact,lanczos", "--batch-size", "50",
                         "--num-batches", "2", "--json", str(js))
    assert code == 0, err
    rec = json.loads(js.read_text())
    spread = rec["spread"]
    assert (spread["batch_size"], spread["num_batches"], spread["full_samples"]) == (50, 2, 300)
    from jax_impl import checkpoint, data, losses, models

    params, arch, _ = checkpoint.load_checkpoint(ckpt)
    ds = data.load_digits()
    flat, unravel = ravel_pytree(models.cast_params(params, jnp.float64))
    apply = models.make_apply(arch)
    rows = plan_spread(len(ds.x_train), 50, 2, seed=0)["rows"]
    assert len(set(np.concatenate(rows).tolist())) == 100  # disjoint
    with jax.enable_x64(True):
        for b, r in enumerate(rows):
            x, y = jnp.asarray(ds.x_train[r], jnp.float64), jnp.asarray(ds.y_train[r])
            h = jax.hessian(lambda f: jnp.mean(losses.cross_entropy(apply(unravel(f), x), y)))(flat)
            evals = np.linalg.eigvalsh(np.asarray(h))
            for name in ("exact", "lanczos"):
                np.testing.assert_allclose(spread["per_batch"][name]["lambda_max"][b], evals[-1], rtol=1e-8)
            np.testing.assert_allclose(spread["per_batch"]["exact"]["trace"][b], np.trace(h), rtol=1e-9)
    for name, qs in spread["summary"].items():
        for q, s in qs.items():
            assert {k: s[k] for k in ("mean", "std", "min", "max", "n")} == summarize(spread["per_batch"][name][q])
    assert spread["summary"]["exact"]["lambda_max"]["full"] == rec["results"]["exact"]["eigenvalues"][0]
    assert spread["summary"]["exact"]["trace"]["full"] == rec["results"]["exact"]["trace"]
    table = out.strip().splitlines()
    i = next(i for i, line in enumerate(table) if line.startswith("2 batches of 50:"))
    assert table[i].split()[-1] == "N=300"
    assert [" ".join(line.split()[:2]) for line in table[i + 1:]] == ["exact λ_max", "exact trace", "lanczos λ_max"]


@pytest.mark.parametrize("argv,match", [
    (["--hessian-samples", "0"], "--hessian-samples is 0; pass a positive number of samples, or all"),
    (["--hessian-samples", "70000"], "--hessian-samples 70000 is outside 1..1500 (the training set size)"),
    (["--hessian-samples", "lots"], "argument --hessian-samples: expected a number of samples or all"),
    (["--stream", "maybe"], "argument --stream: invalid choice"),
    (["--batch-size", "2000"], "--batch-size 2000 is larger than the 1500 training samples"),
    (["--batch-size", "0"], "--batch-size is 0"),
    (["--batch-size", "1000", "--num-batches", "2"], "need 2000 samples but the training set has 1500"),
    (["--num-batches", "3"], "--num-batches was given without --batch-size"),
])
def test_bad_sizes_one_line_error_before_work(capsys, tmp_path, argv, match):
    js = tmp_path / "r.json"
    code, out, err = run(capsys, "eigs", *SMALL, *argv, "--json", str(js))
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and match in lines[-1], lines[-1]
    assert "Traceback" not in err and not js.exists()
    assert not any(line.startswith("training ") for line in lines)  # refused before any training


def test_mnist_beyond_the_training_set(capsys, mnist_path):
    code, _, err = run(capsys, "trace", "--dataset", "mnist", "--data-dir", str(mnist_path),
                       "--hessian-samples", "70000")
    assert code == 2 and err.strip().splitlines()[-1].startswith(
        "error: --hessian-samples 70000 is outside 1..60000 (the training set size)")
