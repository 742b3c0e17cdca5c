"""bench runs end to end on a tiny problem and writes its JSON and CSV (no timing is asserted here)."""

import csv
import json

from benchmarks import registry
from benchmarks.cli import main


def test_bench_smoke(tmp_path, capsys, monkeypatch):
    # the PyTorch side is exercised by the crosscheck and reproduce tests; here only the harness
    monkeypatch.setattr(registry, "torch_available", lambda: "not installed (test)")
    code = main(["bench", "--dataset", "digits", "--hidden", "4", "--hessian-samples", "60", "--epochs", "1",
                 "--repeats", "1", "--widths", "4", "--out", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "PyTorch / JAX" in out
    (js,) = tmp_path.glob("bench_*.json")
    result = json.loads(js.read_text())
    t = result["timings"]
    for item in ("jax_hvp", "jax_exact_hessian", "jax_eigvalsh", "lanczos_top10_matched", "jax_hutchinson",
                 "jax_kfra"):
        assert t[item]["median"] > 0 and t[item]["min"] <= t[item]["median"] <= t[item]["max"]
    # matched accuracy really reached: every one of the ten within 1e-3 of exact
    assert result["notes"]["lanczos_top10_matched"]["max_rel_err"] <= 1e-3
    rows = list(csv.DictReader((tmp_path / "bench.csv").open()))
    assert {r["item"] for r in rows} >= set(t) and all(r["machine"] for r in rows)
    sweep = result["width_sweep"][0]
    assert sweep["width"] == 4
    # issue 14: every algorithm's per-matvec cost against the bare Hvp, and compile times apart
    assert {"lanczos", "power", "hutchinson", "xtrace"} <= set(sweep["per_matvec_over_hvp"])
    assert all(v > 0 for v in sweep["per_matvec_over_hvp"].values())
    assert all(t[i]["first_call"] > 0 for i in ("jax_hvp", "jax_hutchinson"))
    assert {"eigvalsh_openblas_syevd", "eigvalsh_openblas_syevd_2stage", "eigvalsh_numpy"} <= set(t)
    # every eigensolver tried gives the product's eigenvalues (float32 round-off of a tiny matrix)
    assert max(result["notes"]["eigensolvers"]["max_abs_diff_over_max"].values()) < 1e-5
    assert "per matvec / bare Hvp" in out and "1st call" in out
