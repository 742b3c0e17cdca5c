"""Fault injection (issue 13): each fault ends in one `error:` line, a clear exit status, and no file lost or left."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from benchmarks.cli import main

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--dataset", "digits", "--hidden", "6", "--hessian-samples", "200", "--epochs", "3"]


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def one_error_line(err: str) -> str:
    lines = [l for l in err.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def snapshot(folder: Path) -> dict:
    """Every file below ``folder`` (hidden ones too) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "w.safetensors"
    assert main(["train", *SMALL, "--out", str(path)]) == 0
    return path


def scaled_copy(ckpt, path, factor):
    """The issue's reproduction: every tensor times ``factor`` (all finite), metadata kept."""
    with safe_open(str(ckpt), framework="numpy") as f:
        meta = f.metadata()
    save_file({k: v * np.float32(factor) for k, v in load_file(str(ckpt)).items()}, str(path), metadata=meta)
    return path


# 1. non-finite curvature -------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["eigs", "--methods", "exact,lanczos"], ["eigs", "--methods", "lanczos,power"],
                                  ["trace", "--methods", "hutchinson"]])
def test_overflowing_weights_one_line_no_json(capsys, tmp_path, ckpt, argv):
    big = scaled_copy(ckpt, tmp_path / "big.safetensors", 1e30)
    js = tmp_path / "x.json"
    t0 = time.perf_counter()
    code, out, err = run(capsys, *argv, *SMALL, "--checkpoint", str(big), "--json", str(js))
    line = one_error_line(err)
    assert code == 2 and "nan" in line.lower() and "largest |weight|" in line and "float64" in line
    assert not js.exists() and out == ""
    assert time.perf_counter() - t0 < 30  # refused before any curvature (was 100 s, then a traceback)


def test_a_method_producing_nan_is_named(monkeypatch, capsys, tmp_path, ckpt):
    """The check after every method: an entry with NaN is an error naming the method, never a blank cell."""
    from benchmarks import methods

    real = methods.METHODS["hutchinson"]
    monkeypatch.setitem(methods.METHODS, "hutchinson", lambda ctx: {**real(ctx), "trace": float("nan")})
    js = tmp_path / "x.json"
    code, _, err = run(capsys, "trace", *SMALL, "--checkpoint", str(ckpt), "--methods", "exact,hutchinson",
                       "--json", str(js))
    line = one_error_line(err)
    assert code == 2 and "hutchinson produced" in line and "trace" in line and not js.exists()


# 2. an output never replaces an input or a foreign file --------------------------------------------
def test_output_that_is_an_input_is_refused(capsys, tmp_path, ckpt):
    ck = tmp_path / "ck.safetensors"
    ck.write_bytes(ckpt.read_bytes())
    before = snapshot(tmp_path)
    code, _, err = run(capsys, "eigs", *SMALL, "--checkpoint", str(ck), "--methods", "lanczos", "--json", str(ck))
    assert code == 2 and "would overwrite the input --checkpoint" in one_error_line(err)
    link = tmp_path / "link.json"
    link.symlink_to(ck)
    code, _, err = run(capsys, "trace", *SMALL, "--checkpoint", str(ck), "--json", str(link))
    assert code == 2 and "would overwrite the input" in one_error_line(err)
    link.unlink()
    assert snapshot(tmp_path) == before


def test_foreign_file_needs_force(capsys, tmp_path, ckpt):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    code, _, err = run(capsys, "train", *SMALL, "--out", str(notes))
    assert code == 2 and "not written by hessian-approx" in one_error_line(err) and "--force" in err
    assert notes.read_text() == "my notes\n"
    js = tmp_path / "r.json"
    js.write_text('{"mine": 1}')
    code, _, err = run(capsys, "eigs", *SMALL, "--checkpoint", str(ckpt), "--methods", "lanczos", "--json", str(js))
    assert code == 2 and js.read_text() == '{"mine": 1}'
    # our own outputs are replaced without --force; foreign ones with it
    code, _, err = run(capsys, "eigs", *SMALL, "--checkpoint", str(ckpt), "--methods", "lanczos", "--json", str(js),
                       "--force")
    assert code == 0 and json.loads(js.read_text())["command"] == "eigs"
    code, _, err = run(capsys, "eigs", *SMALL, "--checkpoint", str(ckpt), "--methods", "lanczos", "--json", str(js))
    assert code == 0, err


# 3. an interrupted re-run leaves the folder as it was ---------------------------------------------
def test_interrupted_rerun_leaves_previous_run(monkeypatch, capsys, tmp_path):
    out = tmp_path / "r3"
    out.mkdir()
    (out / "results.json").write_text(json.dumps({"command": "reproduce", "seed": 0}))
    (out / "model.safetensors").write_bytes(b"seed-0 model")
    before = snapshot(out)
    import benchmarks.reproduce as rp

    def interrupted(ctx, names, record, on_error):  # after the new model.safetensors was written
        assert any(tmp_path.glob(".r3.partial-*/model.safetensors"))
        raise KeyboardInterrupt

    monkeypatch.setattr(rp, "run_methods", interrupted)
    code, _, err = run(capsys, "reproduce", *SMALL, "--seed", "1", "--out", str(out))
    line = one_error_line(err)
    assert code == 130 and "was left as it was" in line and "no result file" not in line
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r3"]  # no staging folder left


def test_reproduce_refuses_an_input_inside_out(capsys, tmp_path, ckpt):
    out = tmp_path / "r3"
    out.mkdir()
    (out / "w.safetensors").write_bytes(ckpt.read_bytes())
    code, _, err = run(capsys, "reproduce", *SMALL, "--checkpoint", str(out / "w.safetensors"), "--out", str(out))
    assert code == 2 and "lies inside --out" in one_error_line(err)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "thesis.tex").write_text("x")
    code, _, err = run(capsys, "reproduce", *SMALL, "--out", str(tmp_path / "foreign"))
    assert code == 2 and "non-empty folder" in one_error_line(err)


# 4. SIGTERM like SIGINT; a long native call reacts at once -----------------------------------------
def cli(*argv, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "benchmarks.cli", *argv], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigterm_while_writing_leaves_no_file(tmp_path):
    # 200,000 hidden units (the reproduction): a 60 MB checkpoint, written for ~0.1 s
    p = cli("train", "--dataset", "digits", "--hidden", "200000", "--epochs", "1", "--out", "m.safetensors",
            cwd=tmp_path)
    deadline = time.monotonic() + 240
    while p.poll() is None and time.monotonic() < deadline and not list(tmp_path.glob(".m.safetensors.*.tmp")):
        time.sleep(0.002)
    assert p.poll() is None, "finished before its temporary file was seen"
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143
    assert "terminated (SIGTERM)" in one_error_line(err) and "m.safetensors was not written" in err
    assert list(tmp_path.iterdir()) == []  # neither our temporary file nor safetensors' own


def test_sigint_during_dense_eigendecomposition_acts_at_once(tmp_path):
    # 7,510 parameters: LAPACK's eigendecomposition takes seconds here; SIGINT used to wait for it (76 s)
    p = cli("eigs", "--dataset", "digits", "--hidden", "100", "--epochs", "1", "--methods", "exact",
            "--hessian-samples", "100", "--json", "e.json", cwd=tmp_path)
    for line in p.stderr:
        if "eigendecomposition" in line:
            break
    time.sleep(1.0)  # inside ?syevd by now (the finiteness check and copy take ~0.2 s)
    assert p.poll() is None
    t0 = time.monotonic()
    p.send_signal(signal.SIGINT)
    rest = p.communicate(timeout=60)[1]
    assert time.monotonic() - t0 < 2.0 and p.returncode == 130
    assert "interrupted" in one_error_line(rest) and list(tmp_path.iterdir()) == []


# 5. seeds ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", ["9223372036854775808", "4294967296", "-1", "1.5"])
def test_seed_range(capsys, tmp_path, seed):
    for flag in ("--seed", "--subset-seed", "--probe-seed"):
        code, _, err = run(capsys, "eigs", *SMALL, flag, seed)
        assert code == 2 and f"argument {flag}: expected an integer seed from 0 to 4294967295" in one_error_line(err)
    from benchmarks.context import Options
    from jax_impl.errors import HessianApproxError
    from jax_impl.train import TrainConfig

    with pytest.raises(HessianApproxError, match="from 0 to 4294967295"):
        Options(seed=2**32)
    with pytest.raises(HessianApproxError, match="4294967295"):
        TrainConfig(seed=2**32)


def test_probe_seed_redraws_probes_on_the_same_subset(capsys, tmp_path, ckpt):
    def trace(*seeds):
        js = tmp_path / "t.json"
        code, _, err = run(capsys, "trace", *SMALL, "--checkpoint", str(ckpt), "--methods", "exact,hutchinson",
                           "--hutchinson-samples", "5", "--json", str(js), "--force", *seeds)
        assert code == 0, err
        rec = json.loads(js.read_text())
        return rec["results"]["exact"]["trace"], rec["results"]["hutchinson"]["trace"], rec["provenance"]

    exact0, hut0, prov0 = trace()
    exact1, hut1, prov1 = trace("--probe-seed", "7")
    exact2, _, prov2 = trace("--subset-seed", "7")
    assert exact1 == exact0 and hut1 != hut0  # same subset, other probes
    assert exact2 != exact0  # another subset
    assert (prov0["subset_seed"], prov0["probe_seed"]) == (0, 0)
    assert (prov1["subset_seed"], prov1["probe_seed"]) == (0, 7) and prov2["subset_seed"] == 7


# 6. late or malformed refusals -----------------------------------------------------------------
@pytest.mark.parametrize("argv,match", [
    (["--dataset", "tfds"], "argument --dataset: invalid choice: 'tfds'"),
    (["--dtype", "float16"], "argument --dtype: invalid choice: 'float16'"),
    (["--power-tol", "nan"], "argument --power-tol: expected a finite tolerance >= 0"),
    (["--power-tol", "-1"], "argument --power-tol: expected a finite tolerance >= 0"),
    (["--pyhessian-trace-tol", "inf"], "argument --pyhessian-trace-tol"),
    (["--methods", ""], "--methods '' names no method"),
    (["--methods", " , "], "names no method"),
    (["--methods", "exact", "-k", "100000"], "k=100000 eigenvalues requested"),
])
def test_refused_in_one_line_before_work(capsys, tmp_path, argv, match):
    js = tmp_path / "r.json"
    code, out, err = run(capsys, "eigs", *SMALL, *argv, "--json", str(js))
    line = one_error_line(err)
    assert code == 2 and match in line, line
    assert len(err.strip().splitlines()) <= 2 and "training" not in err  # no usage block, no work
    assert list(tmp_path.iterdir()) == []


def test_json_parent_is_a_file_refused_before_work(capsys, tmp_path):
    (tmp_path / "afile").write_text("x")
    code, _, err = run(capsys, "eigs", *SMALL, "--json", str(tmp_path / "afile" / "r.json"))
    assert code == 2 and "is a file, not a folder" in one_error_line(err) and "training" not in err


def test_folder_and_file_swapped(capsys, tmp_path):
    code, _, err = run(capsys, "eigs", *SMALL, "--checkpoint", str(tmp_path))
    assert code == 2 and "is a folder" in one_error_line(err)
    (tmp_path / "f").write_text("x")
    code, _, err = run(capsys, "eigs", "--dataset", "mnist", "--data-dir", str(tmp_path / "f"))
    assert code == 2 and "is a file, not a folder" in one_error_line(err)


def test_relative_error_of_a_zero_eigenvalue_is_bounded():
    from benchmarks.record import REL_FLOOR, compare_to_reference

    record = {"results": {"exact": {"eigenvalues": [10.0, 0.0], "trace": 10.0, "spectrum": [10.0, 0.0]},
                          "m": {"eigenvalues": [10.0, 1e-7], "trace": 10.0}}}
    err = compare_to_reference(record)["m"]["max_rel_err_topk"]
    assert err == pytest.approx(1e-7 / (REL_FLOOR * 10.0))  # 1e-2, not 1e-7/1e-30
