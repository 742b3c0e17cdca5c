"""The command line end to end on the 8x8 digits: records, tables, checkpoints and every error path."""

import json

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from benchmarks.cli import main
from benchmarks.schema import validate

SMALL = ["--dataset", "digits", "--hidden", "6", "--hessian-samples", "200", "--epochs", "3"]


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "w.safetensors"
    assert main(["train", *SMALL, "--out", str(path)]) == 0
    return path


def test_eigs_record_agrees_with_float64_eigh(capsys, tmp_path, ckpt, x64):
    js = tmp_path / "eigs.json"
    code, out, err = run(capsys, "eigs", *SMALL, "--checkpoint", str(ckpt), "--dtype", "float64",
                         "-k", "5", "--json", str(js))
    assert code == 0, err
    rec = json.loads(js.read_text())
    validate(rec)
    prov = rec["provenance"]
    assert prov["dataset"] == "digits" and "digits" in prov["dataset_note"]
    assert prov["num_params"] == 64 * 6 + 6 + 6 * 10 + 10 and prov["dtype"] == "float64"
    exact = rec["results"]["exact"]
    assert len(exact["spectrum"]) == prov["num_params"]
    assert abs(exact["trace"] - exact["sum_eigenvalues"]) < 1e-9 * abs(exact["trace"])
    lan = np.asarray(rec["results"]["lanczos"]["eigenvalues"])
    np.testing.assert_allclose(lan, exact["eigenvalues"], rtol=1e-10)  # float64 end to end
    assert rec["comparisons"]["lanczos"]["max_rel_err_topk"] < 1e-10
    assert "lanczos" in out and "power" in out  # the table on stdout
    assert "Hessian" in err or "running" in err  # progress on stderr


def test_trace_and_density(capsys, tmp_path, ckpt):
    js = tmp_path / "t.json"
    assert run(capsys, "trace", *SMALL, "--checkpoint", str(ckpt), "--hutchinson-samples", "64",
               "--json", str(js))[0] == 0
    res = json.loads(js.read_text())["results"]
    h = res["hutchinson"]
    assert abs(h["trace"] - res["exact"]["trace"]) < 4 * h["stderr"]
    assert len(h["running_mean"]) == 64
    js2 = tmp_path / "d.json"
    assert run(capsys, "density", *SMALL, "--checkpoint", str(ckpt), "--slq-steps", "30",
               "--json", str(js2))[0] == 0
    slq = json.loads(js2.read_text())["results"]["slq"]
    assert np.allclose(np.sum(slq["weights"], axis=1), 1.0, atol=1e-4)


@pytest.mark.parametrize("argv,match", [
    (["eigs", *SMALL, "-k", "100000"], "k=100000 eigenvalues requested"),
    (["eigs", *SMALL, "--hessian-samples", "99999"], "--hessian-samples 99999"),
    (["eigs", *SMALL, "--checkpoint", "/nonexistent.safetensors"], "does not exist"),
    (["eigs", *SMALL, "--methods", "exact,magic"], "unknown method"),
    (["eigs", *SMALL, "--hutchinson-samples", "0"], "--hutchinson-samples is 0"),
    (["eigs", *SMALL, "--lanczos-steps", "3", "--methods", "lanczos"], "--lanczos-steps 3 is outside"),
    (["density", *SMALL, "--slq-steps", "100000"], "--slq-steps 100000 exceeds"),
    (["eigs", *SMALL, "--seed", "-1"], "argument --seed: expected an integer seed from 0 to 4294967295"),
    (["eigs", *SMALL[:2], "--model", "cnn"], "conv16k5 has a 5-wide window but its input is only 2 high"),
    (["eigs", *SMALL[:2], "--model", "conv4k3-relu-flatten-dense7"], "ends in 7 outputs"),
    (["eigs", *SMALL[:2], "--model", "conv4k3-swish-flatten-dense10"], "'swish' is not understood"),
    (["eigs", *SMALL[:2], "--model", "cnn", "--hidden", "5"], "--hidden applies to --model mlp"),
])
def test_bad_input_one_line_error_no_file(capsys, tmp_path, argv, match):
    js = tmp_path / "r.json"
    code, out, err = run(capsys, *argv, "--json", str(js))
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and match in last
    assert "Traceback" not in err
    assert not js.exists() and list(tmp_path.iterdir()) == []


def test_unwritable_outputs_refused_before_work(capsys, tmp_path):
    (tmp_path / "afile").write_text("x")
    code, _, err = run(capsys, "reproduce", *SMALL, "--out", str(tmp_path / "afile"))
    assert code == 2 and "not a folder" in err and "training" not in err
    code, _, err = run(capsys, "eigs", *SMALL, "--json", str(tmp_path))
    assert code == 2 and "is a directory" in err and "training" not in err


def test_checkpoint_mismatch_and_nan(capsys, tmp_path, ckpt):
    code, _, err = run(capsys, "eigs", *SMALL[:2], "--hidden", "7", "--checkpoint", str(ckpt))
    assert code == 2 and "64 dense6-relu-dense10" in err and "64 dense7-relu-dense10" in err
    tensors = load_file(str(ckpt))
    tensors["Dense_1/bias"][2] = np.nan
    from safetensors import safe_open

    with safe_open(str(ckpt), framework="numpy") as f:
        meta = f.metadata()
    bad = tmp_path / "nan.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    code, _, err = run(capsys, "eigs", *SMALL, "--checkpoint", str(bad))
    assert code == 2 and "Dense_1/bias" in err and "NaN or Inf" in err


def test_dense_that_will_not_fit_is_refused_before_work(capsys, monkeypatch):
    import jax_impl.materialize as mat

    monkeypatch.setattr(mat, "available_bytes", lambda device=None: 1000)
    code, _, err = run(capsys, "eigs", *SMALL)
    assert code == 2 and "GiB are available" in err and "lanczos" in err
    assert "training" not in err  # refused before any training


def test_approx_one_method_with_its_backpack_twin(capsys, tmp_path, ckpt, x64):
    pytest.importorskip("backpack", reason="the torch extra is not installed")
    js = tmp_path / "a.json"
    assert run(capsys, "approx", *SMALL, "--checkpoint", str(ckpt), "--method", "diag-h", "--dtype", "float64",
               "--json", str(js))[0] == 0
    res = json.loads(js.read_text())["results"]
    assert set(res) == {"exact", "ggn", "diag-h", "backpack:diag-h"}
    # the exact Hessian diagonal sums to the exact trace, in both frameworks
    for name in ("diag-h", "backpack:diag-h"):
        assert abs(res[name]["trace"] - res["exact"]["trace"]) < 1e-10 * abs(res["exact"]["trace"])
    assert res["backpack:diag-h"]["vs_jax_rel_err"] < 1e-12


CNN = ["--dataset", "digits", "--model", "conv3k3-relu-maxpool2-flatten-dense10", "--hessian-samples", "60",
       "--epochs", "2"]


def test_cnn_from_a_layer_string_end_to_end(capsys, tmp_path):
    """8x8 digits as (8, 8, 1) images; the record names the architecture; Lanczos equals eigh in float64."""
    ck = tmp_path / "cnn.safetensors"
    assert run(capsys, "train", *CNN, "--out", str(ck))[0] == 0
    js = tmp_path / "e.json"
    with jax.enable_x64(True):  # this run in float64; the others below in float32, with 64-bit JAX off
        code, out, err = run(capsys, "eigs", "--dataset", "digits", "--hessian-samples", "60", "--checkpoint", str(ck),
                             "--dtype", "float64", "-k", "4", "--methods", "exact,lanczos", "--json", str(js))
    jax.config.update("jax_enable_x64", False)  # --dtype float64 switched it on process-wide, as for one CLI run
    assert code == 0, err
    rec = json.loads(js.read_text())
    validate(rec)
    prov = rec["provenance"]
    assert prov["model"] == "8x8x1 conv3k3-relu-maxpool2-flatten-dense10"  # read from the checkpoint
    assert prov["num_params"] == (3 * 3 * 1 * 3 + 3) + (3 * 3 * 3 * 10 + 10) == 310  # 8 -conv3-> 6 -pool2-> 3
    exact = rec["results"]["exact"]
    np.testing.assert_allclose(rec["results"]["lanczos"]["eigenvalues"], exact["eigenvalues"], rtol=1e-10)
    # the Kronecker convention reaches the library and the record; reduce and expand differ on a conv net
    traces = {}
    for conv in ("reduce", "expand"):
        js = tmp_path / f"{conv}.json"
        code, _, err = run(capsys, "approx", "--dataset", "digits", "--hessian-samples", "60", "--checkpoint", str(ck),
                           "--methods", "kflr", "--kfac-approx", conv, "--json", str(js))
        assert code == 0, err
        rec = json.loads(js.read_text())
        assert rec["results"]["kflr"]["kfac_approx"] == conv == rec["provenance"]["kfac_approx"]
        traces[conv] = rec["results"]["kflr"]["trace"]
    assert abs(traces["reduce"] - traces["expand"]) > 1e-3 * abs(traces["expand"])


def test_exact_routes_agree(capsys, tmp_path, ckpt):
    """--exact-route structure (per-layer contractions) and hvp (d Hvps) give the same spectrum;
    structure refuses a smooth network in one line."""
    spectra = {}
    for route in ("structure", "hvp"):
        js = tmp_path / f"{route}.json"
        code, _, err = run(capsys, "eigs", *SMALL, "--checkpoint", str(ckpt), "--methods", "exact,ggn",
                           "--exact-route", route, "--json", str(js))
        assert code == 0, err
        rec = json.loads(js.read_text())
        assert rec["results"]["exact"]["route"] == route and rec["provenance"]["exact_route"] == route
        spectra[route] = (np.asarray(rec["results"]["exact"]["spectrum"]), np.asarray(rec["results"]["ggn"]["spectrum"]))
    for a, b in zip(spectra["structure"], spectra["hvp"]):
        np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(b).max())  # float32 sums in another order
    code, _, err = run(capsys, "eigs", *SMALL, "--activation", "tanh", "--methods", "exact",
                       "--exact-route", "structure")
    assert code == 2 and "needs a piecewise-linear network, but layer 1 is tanh" in err.strip().splitlines()[-1]
