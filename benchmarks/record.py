"""The result record: provenance, per-method entries, comparisons against exact, JSON and table output."""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np

from jax_impl.fileio import atomic_write

SCHEMA_VERSION = 1
REL_FLOOR = 1e-6  # relative errors use max(|reference|, REL_FLOOR x the reference's scale)


def versions() -> dict:
    """Versions of the packages that produce numbers (absent ones are left out)."""
    out = {"python": platform.python_version()}
    for name in ("hessian-approx", "jax", "jaxlib", "flax", "optax", "numpy", "scipy", "mkl", "torch",
                 "backpack-for-pytorch", "pyhessian"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    from jax_impl.algorithms.lapack import driver

    out["cpu_eigensolver"] = driver()  # the dense eigvalsh on the CPU: MKL's or OpenBLAS's ?syevd
    return out


def machine() -> str:
    """One-line description of this machine: CPU, core count, accelerators."""
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    devs = jax.devices()
    kinds = sorted({getattr(d, "device_kind", d.platform) for d in devs})
    return f"{cpu}, {os.cpu_count()} cores, {len(devs)}x {'/'.join(kinds)}"


def to_jsonable(obj):
    """numpy/jax scalars and arrays -> python floats and lists; NaN/Inf -> None."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return to_jsonable(np.asarray(obj).tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (np.floating,)):
        return to_jsonable(float(obj))
    if isinstance(obj, (np.integer,)):
        return int(obj)
    return obj


def ran(entry) -> bool:
    """True when a method's entry holds results (not an error, not 'not run')."""
    return isinstance(entry, dict) and "error" not in entry and entry.get("status") != "not run"


def new_record(command: str, provenance: dict) -> dict:
    return {"command": command, "schema_version": SCHEMA_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "provenance": provenance, "results": {}}


def write_json(path, record: dict) -> None:
    """Write the record atomically (temporary file, then rename)."""
    text = json.dumps(to_jsonable(record), indent=1, allow_nan=False)

    def write(tmp):
        Path(tmp).write_text(text + "\n")

    atomic_write(path, write)


def compare_to_reference(record: dict, reference: str = "exact", k: int | None = None) -> dict:
    """Errors of every method against ``reference`` (top-k eigenvalues, trace).

    Returns {method: {"max_rel_err_topk": ..., "rel_err_trace": ...}} for the methods
    that share a quantity with the reference. Relative errors are |a-b|/max(|b|, floor) with
    floor = REL_FLOOR·|b|max: an eigenvalue below a millionth of the largest (a zero one, say)
    is compared relative to the spectrum's scale, not to its own round-off.
    """
    results = record["results"]
    ref = results.get(reference)
    if not ref:
        return {}
    out = {}
    for name, entry in results.items():
        if name == reference or not isinstance(entry, dict) or "error" in entry:
            continue
        row = {}
        if ref.get("eigenvalues") is not None and entry.get("eigenvalues") is not None:
            a = np.asarray(entry["eigenvalues"], float)
            b = np.asarray(ref["eigenvalues"], float)
            m = min(len(a), len(b), k or len(a))
            if m:
                floor = max(REL_FLOOR * float(np.max(np.abs(b))), np.finfo(np.float64).tiny)
                row["max_rel_err_topk"] = float(np.max(np.abs(a[:m] - b[:m]) / np.maximum(np.abs(b[:m]), floor)))
        if ref.get("trace") is not None and entry.get("trace") is not None:
            scale = float(np.sum(np.abs(ref["spectrum"]))) if ref.get("spectrum") else abs(ref["trace"])
            row["rel_err_trace"] = abs(entry["trace"] - ref["trace"]) / max(abs(ref["trace"]), REL_FLOOR * scale,
                                                                            np.finfo(np.float64).tiny)
        if row:
            out[name] = row
    return out


def _fmt(x, width=10):
    if x is None:
        return "-".rjust(width)
    if isinstance(x, float):
        return f"{x:.4g}".rjust(width)
    return str(x).rjust(width)


def format_table(record: dict, k: int = 5) -> str:
    """The record as a plain-text table: one row per method."""
    results = record["results"]
    comps = record.get("comparisons", {})
    cols = [f"λ{i + 1}" for i in range(k)] + ["trace", "err topk", "err trace", "matvecs", "seconds"]
    name_w = max([len("method")] + [len(n) for n in results]) + 1
    lines = ["method".ljust(name_w) + "".join(c.rjust(11) for c in cols)]
    for name, entry in results.items():
        if not isinstance(entry, dict):
            continue
        if "error" in entry or entry.get("status") == "not run":
            why = entry.get("error") or entry.get("reason", "not run")
            lines.append(name.ljust(name_w) + f" not run: {why}")
            continue
        eig = list(entry.get("eigenvalues") or [])[:k]
        cells = [float(e) for e in eig] + [None] * (k - len(eig))
        c = comps.get(name, {})
        cells += [entry.get("trace"), c.get("max_rel_err_topk"), c.get("rel_err_trace"),
                  entry.get("matvecs"), entry.get("seconds")]
        lines.append(name.ljust(name_w) + "".join(" " + _fmt(v) for v in cells))
    prov = record.get("provenance", {})
    head = (f"{record['command']}: {prov.get('model', '?')}, {prov.get('dataset', '?')} "
            f"({prov.get('hessian_samples', '?')} samples), {prov.get('dtype', '?')}")
    return "\n".join([head] + lines)
