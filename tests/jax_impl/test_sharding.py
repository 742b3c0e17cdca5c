"""Sharding the sample axis over 4 (forced host) devices gives the single-device results to rounding."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.conftest import REPO

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_enable_x64", True)
    from jax_impl import losses, models, operators, sharding
    spec = models.parse(sys.argv[1], json.loads(sys.argv[2]))
    params = models.cast_params(models.init_params(spec, jax.random.PRNGKey(0)), jnp.float64)
    r = np.random.default_rng(0)
    x, y = r.normal(size=(103, *spec.input_shape)), r.integers(0, 4, 103)
    b = sharding.sharded_batches(x, y, chunk_size=16, dtype=jnp.float64)
    prob = operators.Problem(models.make_apply(spec), losses.cross_entropy, params, b)
    v = jnp.asarray(r.normal(size=prob.dim))
    hvp = jax.jit(operators.hvp(prob))
    text = hvp.lower(v).compile().as_text()
    out = {"devices": len(jax.devices()), "shards": len(b.x.sharding.device_set),
           "all_reduce": "all-reduce" in text,
           "loss": float(operators.loss(prob)), "hvp": np.asarray(hvp(v)).tolist(),
           "ggn": np.asarray(jax.jit(operators.ggn_vp(prob))(v)).tolist()}
    print(json.dumps(out))
""")


def run(devices: int, arch: str = "dense7-tanh-dense4", shape=(12,)) -> dict:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, arch, json.dumps(list(shape))], env=env, capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("arch,shape", [("dense7-tanh-dense4", (12,)),
                                        ("conv3k3-relu-maxpool2-flatten-dense4", (6, 6, 2))])
def test_four_devices_equal_one(arch, shape):
    """Flat inputs (N, D) and images (N, H, W, C) alike."""
    one, four = run(1, arch, shape), run(4, arch, shape)
    assert one["devices"] == 1 and four["devices"] == 4
    assert four["shards"] == 4 and four["all_reduce"]  # really split, really summed across devices
    # float64: only the summation order differs between the two layouts
    assert abs(one["loss"] - four["loss"]) < 1e-13
    for key in ("hvp", "ggn"):
        a, b = np.asarray(one[key]), np.asarray(four[key])
        assert np.max(np.abs(a - b)) <= 1e-12 * np.max(np.abs(a))
