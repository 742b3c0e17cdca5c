"""reproduce on a small configuration: every file written, the JSON valid, the report equal to the JSON, figures real."""

import json
import re

import numpy as np
import pytest
from PIL import Image

from benchmarks import registry
from benchmarks.cli import main
from benchmarks.report import summary_rows
from benchmarks.schema import validate

SMALL = ["--dataset", "digits", "--hidden", "6", "--hessian-samples", "120", "--epochs", "3", "-k", "5",
         "--sweep-samples", "40", "--sweep-seeds", "3", "--slq-steps", "20", "--hutchinson-samples", "30",
         "--trace-study-matvecs", "12", "--trace-study-seeds", "2"]  # the study's own tests: test_trace_study
FILES = ["results.json", "report.md", "model.safetensors", "fig1_top10_eigenvalues.png", "fig2_trace.png",
         "fig3_hutchinson_samples.png", "fig4_density.png", "fig5_trace_study.png", "fig6_eigenvector_overlap.png"]


def numbers_in_report_table(text: str) -> list[list[str]]:
    table = text.split("## Summary")[1].split("##")[0]
    return [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()
            if line.startswith("|") and not line.startswith("|---") and "method" not in line]


def check_outputs(out, torch_ran: bool):
    for name in FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    rec = json.loads((out / "results.json").read_text())
    validate(rec)
    res = rec["results"]
    for name in ("exact", "lanczos", "power", "hutchinson", "slq", "diag-h", "kfac", "kflr", "kfra"):
        assert "eigenvalues" in res[name] or "trace" in res[name], name
    for name, entry in res.items():
        assert "error" not in entry, (name, entry.get("error"))
    for name in ("torch:exact", "pyhessian", "pyhessian:trace", "backpack:kflr"):
        assert (res[name].get("status") != "not run") == torch_ran, name
    sweep = rec["hutchinson_sweep"]
    assert sweep["num_samples"][0] == 1 and sweep["num_samples"][-1] == 40 and sweep["seeds"] == 3
    # the report's table is the JSON's numbers, formatted with 4 significant digits
    rows = numbers_in_report_table((out / "report.md").read_text())
    expected = summary_rows(rec)
    assert len(rows) == len(expected)
    for row, exp in zip(rows, expected):
        for cell, key in zip(row[1:4], ("trace", "trace_seconds", "top_eigenvalue")):
            if exp[key] is None:
                assert cell == "not run"
            else:
                assert float(cell) == pytest.approx(exp[key], rel=5e-3 if key != "trace_seconds" else 1e-2, abs=1e-3)
    text = (out / "report.md").read_text()
    assert len(re.findall(r"\*\*(held|did not hold|not checked)\*\*", text)) >= 4
    for fig in FILES[3:]:
        img = np.asarray(Image.open(out / fig).convert("L"), float)
        assert img.shape[0] > 300 and img.shape[1] > 400, fig
        assert img.std() > 10, f"{fig} looks empty"
    return rec


def test_reproduce_small(tmp_path, capsys):
    if registry.torch_available() is not None:
        pytest.skip("the torch extra is not installed")
    assert main(["reproduce", *SMALL, "--out", str(tmp_path)]) == 0
    rec = check_outputs(tmp_path, torch_ran=True)
    assert rec["crosscheck"]["hessian"]["rel_frobenius"] < 1e-5
    assert "held" in capsys.readouterr().out


def test_reproduce_without_torch_marks_columns_not_run(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "torch_available", lambda: "ImportError: No module named 'torch'")
    assert main(["reproduce", *SMALL, "--out", str(tmp_path)]) == 0
    rec = check_outputs(tmp_path, torch_ran=False)
    assert "torch extra" in rec["results"]["pyhessian"]["reason"]
    assert "not run" in (tmp_path / "report.md").read_text()
