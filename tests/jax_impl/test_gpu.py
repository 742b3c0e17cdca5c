"""GPU against CPU in float64 (Hvp, GGN-vp, Lanczos top-10, approximations) on the default MLP and a small CNN; run_gpu.sh's CPU-testable parts."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import bench_gpu
from hessian_approx.errors import HessianApproxError
from jax_impl import algorithms, losses, models, operators
from jax_impl.approx import APPROXIMATIONS
from tests.cases import case
from tests.conftest import REPO

BACKEND = jax.default_backend()
SKIP_GPU = pytest.mark.skipif(BACKEND != "gpu", reason=f"no GPU: jax.default_backend() is {BACKEND!r} (needs an "
                              "NVIDIA GPU and jax with CUDA: pip install -e '.[cuda]')")


def needs_gpu(test):
    """Skipped without a GPU; float64 (the ``x64`` fixture) where it runs."""
    return SKIP_GPU(pytest.mark.usefixtures("x64")(test))


# float64 on both backends: the same terms summed in other orders by other kernels (cuBLAS against
# Eigen), about 1e-14 relative for sums of a few thousand terms; 1e-10 of the largest entry
# leaves four orders of margin. Lanczos top-10 after 40 steps (full reorthogonalization) from one
# start vector: rounding differences in the matvecs carry through the three-term recurrence into
# Ritz values that have not converged, so 1e-8 of |theta_1|. Not yet run on a GPU here.
RTOL = 1e-10
RTOL_LANCZOS = 1e-8
LANCZOS_STEPS = 40
# the default MLP (784-10-10, 7,960 parameters) on 256 samples in chunks of 100 (the last padded);
# a small CNN from the registry (conv-relu-maxpool-conv-relu-flatten-dense, inputs with tied maxima)
MODELS = {"mlp": (lambda: models.mlp(784, (10,), 10, "relu"), 256, 100),
          "cnn": (lambda: case("cnn-max", "relu", "cross_entropy").arch, 64, 24)}


def rel(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@functools.lru_cache(maxsize=None)
def setup(name):
    """(arch, float64 numpy parameters with perturbed biases, x with ~half exact zeros, y, chunk)."""
    make, n, chunk = MODELS[name]
    arch = make()
    r = np.random.default_rng(0)
    x = np.where(r.random((n, *arch.input_shape)) < 0.5, 0.0, r.normal(size=(n, *arch.input_shape)))
    y = r.integers(0, arch.num_classes, n)
    with jax.enable_x64(True), jax.default_device(jax.devices("cpu")[0]):
        params = models.init_params(arch, jax.random.PRNGKey(0), jnp.float64)
    params = jax.tree_util.tree_map(lambda a: np.asarray(a) + 0.1 * np.sin(np.arange(a.size).reshape(a.shape) + 1.0),
                                    params)
    return arch, params, x, y, chunk


def on(device, name):
    """(arch, Problem) with parameters and data placed on ``device``."""
    arch, params, x, y, chunk = setup(name)
    batches = jax.device_put(operators.make_batches(x, y, chunk, dtype=jnp.float64), device)
    return arch, operators.Problem(models.make_apply(arch), losses.get_loss("cross_entropy"),
                                   jax.device_put(params, device), batches)


def cpu_and_gpu(name, fn):
    """{"cpu": ..., "gpu": ...}: ``fn(arch, problem, put)`` computed on each backend, as numpy; ``put`` places
    an array on that backend. Checks that each result is float64 and lies on its own device."""
    out = {}
    for dev in (jax.devices("cpu")[0], jax.devices("gpu")[0]):
        with jax.default_device(dev):
            arch, prob = on(dev, name)
            res = fn(arch, prob, lambda a: jax.device_put(a, dev))
            for leaf in jax.tree_util.tree_leaves(res):
                assert leaf.dtype == jnp.float64 and leaf.devices() == {dev}, (leaf.dtype, leaf.devices())
            out[dev.platform] = jax.tree_util.tree_map(np.asarray, res)
    return out


@needs_gpu
@pytest.mark.parametrize("name", MODELS)
def test_hvp_and_ggn_vp_gpu_equal_cpu(name):
    v = np.random.default_rng(1).standard_normal(setup(name)[0].num_params)
    r = cpu_and_gpu(name, lambda arch, prob, put: {op: jax.jit(operators.OPERATORS[op](prob).matvec)(put(v))
                                                  for op in ("hessian", "ggn")})
    for op in ("hessian", "ggn"):
        assert rel(r["gpu"][op], r["cpu"][op]) <= RTOL, op


@needs_gpu
@pytest.mark.parametrize("name", MODELS)
def test_lanczos_top10_gpu_equals_cpu(name):
    v0 = np.random.default_rng(2).standard_normal(setup(name)[0].num_params)

    def top10(arch, prob, put):
        run = jax.jit(lambda v: algorithms.lanczos(operators.hvp(prob), None, k=10, num_steps=LANCZOS_STEPS, v0=v))
        return run(put(v0)).eigenvalues

    r = cpu_and_gpu(name, top10)
    assert np.max(np.abs(r["gpu"] - r["cpu"])) <= RTOL_LANCZOS * abs(r["cpu"][0])


@needs_gpu
@pytest.mark.parametrize("method", sorted(APPROXIMATIONS))
@pytest.mark.parametrize("name", MODELS)
def test_approximation_gpu_equals_cpu(name, method):
    """matvec, trace and top-10 eigenvalues of each structure; the Monte-Carlo ones draw from one key."""
    v = np.random.default_rng(3).standard_normal(setup(name)[0].num_params)

    def parts(arch, prob, put):
        s = APPROXIMATIONS[method](prob, arch, jax.random.PRNGKey(0), 1)
        return {"matvec": s.matvec(put(v)), "trace": s.trace(), "top10": s.eigenvalues(10)}

    r = cpu_and_gpu(name, parts)
    for part in ("matvec", "trace", "top10"):
        assert rel(r["gpu"][part], r["cpu"][part]) <= RTOL, part


# ---- the benchmark's and the script's logic, on the CPU --------------------------------------------------


def test_chunk_rules_against_hand_counts():
    cnn = models.parse("cnn", (28, 28, 1))
    # conv8k5: 24x24x8 out + 24x24 x (5x5x1) patches; relu; pool 12x12x8; conv16k5: 8x8x16 + 8x8 x (5x5x8);
    # relu; pool 4x4x16; flatten 256; dense 10
    assert bench_gpu.per_sample_floats(cnn) == 4608 + 14400 + 4608 + 1152 + 1024 + 12800 + 1024 + 256 + 256 + 10
    mlp = models.mlp(784, (10,), 10, "relu")
    assert bench_gpu.per_sample_floats(mlp) == 30
    assert bench_gpu.chunk_for(60000, 30) == 60000  # 1.8M floats: one chunk
    assert bench_gpu.chunk_for(60000, 40138) == 6667  # 2^28 // 40138 = 6687 a chunk at most: 9 equal chunks
    assert bench_gpu.chunk_for(5, 10**12) == 1
    assert bench_gpu.gpu_columns(mlp, 60000) == 128  # 2^28 // (60000 x 30) = 149
    assert bench_gpu.gpu_columns(mlp, 10) == 1024 and bench_gpu.gpu_columns(cnn, 6667) == 8
    assert bench_gpu.structure_floats(mlp) == 7850 * 10  # Dense_0's (784 + 1) x 10 parameters x 10 classes


def fake_bench(tmp_path, stamp, exact_s, cnn_s, lanczos_s, pyhessian_s, matched=True, backend="gpu", samples=60000):
    """A bench_gpu result with the given medians, judged and written as bench_gpu_<stamp>.json."""
    tm = lambda s: {"median": s, "min": s, "max": s, "first_call_s": s, "compile_s": 0.0}
    result = {"backend": backend, "torch": "torch on a card", "config": {"samples": samples, "cnn_samples": samples,
                                                                          "mlp": "mlp", "cnn": "cnn"},
              "items": {"mlp": {"timings": {"exact_and_eigenvalues": tm(exact_s), "lanczos_top10_matched": tm(lanczos_s),
                                            "pyhessian_top10_matched": tm(pyhessian_s)},
                                "notes": {"lanczos_top10_matched": {"matched": True},
                                          "pyhessian_top10_matched": {"matched": matched, "device": "cuda"}}},
                        "cnn": {"timings": {"hvp": tm(cnn_s)}}}}
    result["targets"] = bench_gpu.judge(result)
    bench_gpu.write_json(tmp_path / f"bench_gpu_{stamp}.json", result)
    return result["targets"]


def test_judge_verdicts(tmp_path):
    t = fake_bench(tmp_path, "a", exact_s=4.0, cnn_s=0.08, lanczos_s=0.01, pyhessian_s=0.25)
    assert [t[k]["met"] for k in bench_gpu.TARGETS] == [True, False, True]
    assert t["lanczos_vs_pyhessian"]["value"] == pytest.approx(25.0)
    t = fake_bench(tmp_path, "b", 4.0, 0.01, 0.01, 0.25, matched=False)
    assert t["lanczos_vs_pyhessian"]["met"] is None and t["lanczos_vs_pyhessian"]["value"] is None
    assert t["lanczos_vs_pyhessian"]["not_applicable"] == "accuracy not matched"
    t = fake_bench(tmp_path, "c", 4.0, 0.01, 0.01, 0.25, backend="cpu", samples=1500)
    assert all(v["met"] is None and "backend is cpu" in v["not_applicable"] and "1500 samples" in v["not_applicable"]
               for v in t.values())


def test_summary_record_and_table(tmp_path, capsys):
    logs = {"install": "have PyHessian\ninstalled none: every wheel's package is present\n",
            "probe": "nvidia-smi: not available\njax 0.10.2 backend=cpu [CpuDevice(id=0)]\n",
            "tests": "....ss\nSKIPPED [2] test_gpu.py:1: no GPU\n4 passed, 2 skipped in 3.10s\n",
            "bench": "bench_gpu: backend cpu\nerror: --samples 9 exceeds; pass fewer\n"}
    for name, text in logs.items():
        (tmp_path / f"{name}.log").write_text(text)
    rows = [("install", "ok", "1.0", ""), ("probe", "ok", "2.5", ""), ("tests", "ok", "9.0", ""),
            ("bench", "failed (2)", "4.0", ""), ("extra", "skipped", "0", "no time left in the 540 s budget")]
    steps = tmp_path / "steps.tsv"
    steps.write_text("".join(f"{n}\t{s}\t{t}\t{note}\t{tmp_path / (n + '.log') if n in logs else ''}\n"
                             for n, s, t, note in rows))
    fake_bench(tmp_path, "S", 4.0, 0.08, 0.01, 0.25)
    rec = bench_gpu.summary(steps, tmp_path, "S", "gpu")
    assert json.loads((tmp_path / "run_gpu_S.json").read_text()) == rec
    assert [r["note"] for r in rec["steps"]] == [
        "installed none: every wheel's package is present", "jax 0.10.2 backend=cpu [CpuDevice(id=0)]",
        "4 passed, 2 skipped in 3.10s", "error: --samples 9 exceeds; pass fewer", "no time left in the 540 s budget"]
    assert "log_tail" in rec["steps"][3] and "log_tail" not in rec["steps"][2] and "backend=cpu" in rec["steps"][1]["log"]
    assert rec["bench"] == "bench_gpu_S.json" and rec["targets"]["cnn_hvp"]["met"] is False
    table = capsys.readouterr().out
    assert "failed (2)" in table and "MISSED" in table and "met" in table
    steps.write_text("install\tok\n")
    with pytest.raises(HessianApproxError, match="line 1 has 2 tab-separated fields"):
        bench_gpu.summary(steps, tmp_path, "T", "cpu")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary files left


@pytest.mark.parametrize("argv, message", [
    (["--repeats", "0"], "error: --repeats is 0; pass a positive number"),
    (["--samples", "ten"], "error: --samples/--cnn-samples is 'ten'; pass a positive integer or all"),
    (["--samples", "5000"], "error: --samples 5000 exceeds the 1500 training samples of digits; pass --data-dir"),
])
def test_bad_flags_are_one_line_errors(tmp_path, capsys, argv, message):
    assert bench_gpu.main(["run", "--smoke", "--no-torch", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(message)
    assert not list(tmp_path.iterdir())


def test_smoke_run_json(tmp_path):
    """A tiny run (digits, d = 310 and 210, seeded initial weights): the record's structure, and its exact
    spectrum against jax.hessian + numpy."""
    from benchmarks.context import Context, Options
    from jax_impl import checkpoint

    mlp, cnn = "dense4-relu-dense10", "conv2k3-relu-maxpool2-flatten-dense10"
    files = {}
    for which, text in (("mlp", mlp), ("cnn", cnn)):
        arch = models.parse(text, (8, 8, 1))
        files[which] = str(tmp_path / f"{which}.safetensors")
        checkpoint.save_checkpoint(files[which], jax.jit(lambda: models.init_params(arch, jax.random.PRNGKey(1)))(), arch)
    out = tmp_path / "out"
    path = bench_gpu.run(out=out, dataset="digits", samples=200, mlp=mlp, cnn=cnn, repeats=1, use_torch=False,
                         steps=(30,), checkpoints=files)
    assert [p.name for p in out.iterdir()] == [path.name] and path.name.startswith("bench_gpu_")
    res = json.loads(path.read_text())
    assert res["backend"] == "cpu" and res["config"]["samples"] == res["config"]["cnn_samples"] == 200
    for item in res["items"].values():
        for tm in item["timings"].values():
            assert tm["min"] <= tm["median"] <= tm["max"] and tm["first_call_s"] > 0 and tm["compile_s"] >= 0
    t = res["items"]["mlp"]["timings"]
    assert {"exact_hessian_hvp_route", "exact_hessian_structure_route", "eigvalsh", "exact_and_eigenvalues",
            "hvp", "lanczos_top10_matched"} <= set(t) and res["items"]["cnn"]["timings"]["hvp"]["repeats"] == 20
    notes = res["items"]["mlp"]["notes"]
    assert notes["lanczos_top10_matched"]["matched"] and notes["lanczos_top10_matched"]["max_rel_err"] <= 1e-3
    assert notes["structure_route"]["max_abs_diff_vs_hvp_route"] <= 1e-5 * notes["structure_route"]["max_abs_entry"]
    assert all(v["met"] is None for v in res["targets"].values())
    assert "--no-torch" in res["targets"]["lanczos_vs_pyhessian"]["not_applicable"]
    # the same weights (training is seeded), the Hessian by jax.hessian, its spectrum by numpy (float32 entries)
    prob = Context(Options(dataset="digits", model=mlp, hessian_samples=200, checkpoint=files["mlp"])).problem
    h = jax.hessian(lambda f: operators.loss(operators.Problem(prob.apply, prob.ell, prob.unravel(f),
                                                               prob.batches)))(prob.flat_params)
    ref = np.linalg.eigvalsh(np.asarray(h, np.float64))[::-1]
    assert np.max(np.abs(np.array(notes["exact_top10"]) - ref[:10])) <= 1e-4 * abs(ref[0])
    assert notes["exact_trace"] == pytest.approx(np.sum(ref), abs=1e-4 * np.sum(np.abs(ref)))


def test_pyhessian_top_against_a_dense_torch_hessian():
    torch = pytest.importorskip("torch")
    pytest.importorskip("pyhessian")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()
    x, y, crit = torch.randn(20, 5, dtype=torch.float64), torch.randint(0, 3, (20,)), torch.nn.CrossEntropyLoss()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(flat):
        parts = torch.split(flat, [s.numel() for s in shapes])
        params = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes)}
        return crit(torch.func.functional_call(model, params, (x,)), y)

    ev = np.linalg.eigvalsh(torch.autograd.functional.hessian(loss, theta).numpy())
    ref = ev[np.argsort(-np.abs(ev))][:3]  # PyHessian's order: largest magnitude first
    crit(model(x), y).backward(create_graph=True)  # a stale gradient with its graph: kept, it would double H
    values, hvps = bench_gpu.pyhessian_top(model, x, y, crit, 3, 1e-10, 1000, 0, "cpu")
    # PyHessian normalizes by (norm + 1e-6) and stops at 1000 iterations per eigenvalue, slow here where
    # |lambda_2| and |lambda_3| are within 1%: seen 4e-5 of |lambda_1|; a doubled gradient would be 100%
    np.testing.assert_allclose(values, ref, atol=2e-4 * abs(ref[0]))
    assert hvps >= 6 and all(p.grad is None for p in model.parameters())
    assert np.array_equal(bench_gpu.pyhessian_top(model, x, y, crit, 3, 1e-10, 1000, 0, "cpu")[0], values)


def run_script(*args, **env):
    return subprocess.run(["bash", str(REPO / "benchmarks" / "run_gpu.sh"), *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHON": sys.executable, **env})


def test_script_refuses_bad_input(tmp_path):
    r = run_script(str(tmp_path))
    assert r.returncode == 2 and r.stderr == f"error: {tmp_path} holds no MNIST IDX files " \
        "(train-images-idx3-ubyte[.gz]); pass the folder with MNIST's four IDX files\n"
    r = run_script(RUN_GPU_BUDGET="ten")
    assert r.returncode == 2 and r.stderr.startswith("error: RUN_GPU_BUDGET is 'ten'") and r.stderr.count("\n") == 1


def test_script_out_of_budget_skips_every_step_and_records_it(tmp_path):
    r = run_script("", str(tmp_path), RUN_GPU_BUDGET="10")
    assert r.returncode == 1, r.stdout + r.stderr
    (rec,) = [json.loads(p.read_text()) for p in tmp_path.glob("run_gpu_*.json")]
    assert [(s["step"], s["status"]) for s in rec["steps"]] == [
        ("install", "skipped"), ("probe", "skipped"), ("tests", "skipped"), ("bench", "skipped")]
    assert rec["mode"] == "cpu" and rec["bench"] is None and "no GPU" in r.stdout
