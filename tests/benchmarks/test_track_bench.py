"""benchmarks.track_bench smoke test: digits, 200 samples, 20 steps, one repeat; the record's fields.

``--skip-track`` leaves out the end-to-end ``track()`` run, whose compiles would double the
test's time; its instrumented copy (the same chunks and ``tracking.measure``) still runs, and
tests/torch_ref/test_track.py compares ``track()``'s losses with the torch loop's.
"""

import json

import pytest

from benchmarks import registry

pytestmark = pytest.mark.skipif(registry.torch_available() is not None, reason="torch/PyHessian not installed")

FIELDS = ("jax_step_seconds", "torch_step_seconds", "jax_tracked_step_seconds", "torch_tracked_step_seconds",
          "jax_overhead", "torch_overhead", "jax_measure_seconds", "torch_measure_seconds",
          "jax_measure_compile_seconds", "ratio_torch_over_jax_per_measurement", "jax_matvecs", "torch_matvecs",
          "sharpness_rel_diff_median", "sharpness_rel_diff_max", "train_loss_rel_diff_max", "meets_target")


def test_track_bench_smoke(tmp_path, capsys):
    from benchmarks import track_bench

    argv = ["--dataset", "digits", "--samples", "200", "--steps", "20", "--every", "10", "--repeats", "1",
            "--skip-track", "--out", str(tmp_path)]
    assert track_bench.main(argv) == 0
    (path,) = tmp_path.glob("track_bench_mlp_200_*.json")
    rec = json.loads(path.read_text())
    assert "target: torch/JAX per measurement" in capsys.readouterr().out
    prov, res = rec["provenance"], rec["results"]
    assert prov["machine"] and prov["versions"]["torch"] and prov["torch_threads"] == 1
    assert prov["steps"] == 20 and prov["every"] == 10 and prov["train_samples"] == 200
    med = res["median"]
    for f in FIELDS:
        assert med[f] is not None, f
    assert med["ratio_torch_over_jax_per_measurement"] > 0 and med["target_ratio"] == 10
    assert med["sharpness_steps"] == [0, 10, 20] and len(med["sharpness_rel_diff"]) == 3
    assert med["sharpness_rel_diff_max"] < 0.05  # same net, same GD: the values track each other
    assert med["jax_overhead_end_to_end"] is None and med["per_call_vs_track_sharpness_max_rel_diff"] is None
    (rep,) = res["repeats"]
    assert rep["jax_track"] is None
    assert rep["jax_per_call"]["steps"] == rep["torch_track"]["steps"] == [0, 10, 20]
    assert len(rep["jax_train"]["train_loss"]) == len(rep["torch_train"]["train_loss"]) == 20
