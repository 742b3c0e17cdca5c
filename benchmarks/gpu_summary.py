"""run_gpu.sh's record of one run (run_gpu_<stamp>.json) and the tables of bench_gpu's targets."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from hessian_approx.errors import HessianApproxError
from hessian_approx.fileio import atomic_write


def new_stamp(out: Path) -> str:
    """A UTC time stamp that no bench_gpu_ or run_gpu_ file in ``out`` has yet."""
    base = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    taken = lambda s: any((out / f"{kind}_{s}.json").exists() for kind in ("bench_gpu", "run_gpu"))
    return next(s for s in [base] + [f"{base}-{i}" for i in range(2, 10**4)] if not taken(s))


def write_json(path: Path, obj: dict) -> None:
    text = json.dumps(obj, indent=1, allow_nan=False)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


# the last line of a step's log matching its pattern becomes the step's note, where the script gave none
NOTE_PATTERNS = {"install": r"(installed|no \.whl)", "probe": r"jax ", "tests": r"(=+ )?\d+ (passed|failed|skipped|errors?)",
                 "bench": r"(wrote |error: )"}


def summary(steps, out, stamp: str, mode: str) -> dict:
    """run_gpu_<stamp>.json in ``out`` (atomically) from the script's steps (TSV: name, status, seconds, note,
    log file; the probe step's log is the device record) and bench_gpu_<stamp>.json; prints the table."""
    out, rows = Path(out), []
    for i, line in enumerate(Path(steps).read_text().splitlines(), 1):
        fields = line.split("\t")
        if len(fields) != 5:
            raise HessianApproxError(f"{steps} line {i} has {len(fields)} tab-separated fields, not 5",
                                     "write name, status, seconds, note and log file on each line")
        name, status, seconds, note, log_file = fields
        text = Path(log_file).read_text(errors="replace") if log_file and Path(log_file).is_file() else ""
        hits = [l.strip() for l in text.splitlines() if re.match(NOTE_PATTERNS.get(name, "$^"), l.strip())]
        rows.append({"step": name, "status": status, "seconds": float(seconds), "note": note or (hits or [""])[-1],
                     **({"log_tail": text[-2000:]} if status != "ok" and text else {}),
                     **({"log": text[-2000:]} if name == "probe" else {})})
    bench = out / f"bench_gpu_{stamp}.json"
    rec = {"run": "benchmarks/run_gpu.sh", "stamp": stamp, "mode": mode, "steps": rows,
           "bench": bench.name if bench.is_file() else None,
           "targets": json.loads(bench.read_text()).get("targets") if bench.is_file() else None}
    write_json(out / f"run_gpu_{stamp}.json", rec)
    print(format_summary(rec))
    return rec


def target_lines(targets: dict | None) -> list[str]:
    lines = [f"{'target':64s}{'value':>10s}{'bound':>10s}  verdict"]
    for tg in (targets or {}).values():
        fmt = (lambda v: f"{v:.4g} s") if tg["kind"] == "seconds" else (lambda v: f"{v:.3g}x")
        value = "-" if tg["value"] is None else fmt(tg["value"])
        bound = ("< " if tg["kind"] == "seconds" else ">= ") + fmt(tg["bound"])
        verdict = {True: "met", False: "MISSED"}.get(tg["met"]) or f"n/a: {tg['not_applicable'] or 'not measured'}"
        lines.append(f"{tg['what']:64s}{value:>10s}{bound:>10s}  {verdict}")
    return lines


def format_summary(rec: dict) -> str:
    lines = [f"run_gpu.sh {rec['stamp']}: {rec['mode']} mode" + ("" if rec["mode"] == "gpu" else
             " (no GPU: GPU tests skipped, smoke benchmark on the CPU, GPU figures pending)"),
             f"{'step':10s}{'status':14s}{'seconds':>9s}  note"]
    lines += [f"{r['step']:10s}{r['status']:14s}{r['seconds']:9.1f}  {r['note'][:100]}" for r in rec["steps"]]
    return "\n".join(lines + [""] + target_lines(rec["targets"]))
