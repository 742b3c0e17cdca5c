"""JSON schema of the result record (see DESIGN.md), used by tests and by `validate`."""

METHOD_ENTRY = {
    "type": "object",
    "properties": {
        "eigenvalues": {"type": ["array", "null"], "items": {"type": ["number", "null"]}},
        "trace": {"type": ["number", "null"]},
        "seconds": {"type": ["number", "null"], "minimum": 0},
        "matvecs": {"type": ["integer", "null"], "minimum": 0},
        "error": {"type": "string"},
        "status": {"type": "string"},
    },
}

RECORD = {
    "type": "object",
    "required": ["command", "provenance", "results"],
    "properties": {
        "command": {"type": "string"},
        "schema_version": {"type": "integer"},
        "provenance": {
            "type": "object",
            "required": ["dataset", "dataset_note", "hessian_samples", "model", "num_params",
                         "dtype", "seed", "devices", "versions"],
            "properties": {
                "dataset": {"type": "string"},
                "hessian_samples": {"type": "integer", "minimum": 1},
                "num_params": {"type": "integer", "minimum": 1},
                "dtype": {"enum": ["float32", "float64"]},
                "devices": {"type": "array", "items": {"type": "string"}},
                "versions": {"type": "object", "required": ["jax"]},
            },
        },
        "results": {"type": "object", "additionalProperties": METHOD_ENTRY},
        "comparisons": {"type": "object"},
    },
}


NUMBER = {"type": ["number", "null"]}  # null: NaN/Inf (e.g. after divergence) or undefined

TRACK_ROW = {
    "type": "object",
    "required": ["step", "loss", "gradient_norm", "sharpness", "eigenvalues", "residuals", "lanczos_matvecs",
                 "converged"],
    "properties": {
        "step": {"type": "integer", "minimum": 0},
        "loss": NUMBER, "gradient_norm": NUMBER, "sharpness": NUMBER,
        "eigenvalues": {"type": "array", "items": NUMBER, "minItems": 1},
        "residuals": {"type": "array", "items": NUMBER},
        "lanczos_matvecs": {"type": "integer", "minimum": 1},
        "converged": {"type": "boolean"},
        "trace": NUMBER, "trace_stderr": NUMBER, "ggn_sharpness": NUMBER, "preconditioned_sharpness": NUMBER,
    },
}

TRACK_RECORD = {
    "type": "object",
    "required": ["command", "provenance", "settings", "rows", "train_loss", "diverged_at", "seconds"],
    "properties": {
        "command": {"const": "track"},
        "schema_version": {"type": "integer"},
        "provenance": {
            "type": "object",
            "required": ["dataset", "train_samples", "batch_size", "hessian_samples", "model", "num_params",
                         "dtype", "seed", "devices", "versions", "weights"],
        },
        "settings": {
            "type": "object",
            "required": ["optimizer", "lr", "steps", "every", "curvature", "threshold", "threshold_name", "tol"],
            "properties": {"optimizer": {"enum": ["sgd", "adam"]}, "lr": {"type": "number", "exclusiveMinimum": 0},
                           "threshold": {"type": "number"}},
        },
        "rows": {"type": "array", "items": TRACK_ROW, "minItems": 1},
        "train_loss": {"type": "array", "items": NUMBER},
        "diverged_at": {"type": ["integer", "null"]},
        "seconds": {"type": "object"},
        "crosscheck": {"type": "array", "items": {
            "type": "object", "required": ["step", "tracked", "pyhessian", "rel_diff_pyhessian", "agrees"]}},
    },
}


def validate(record: dict) -> None:
    """Raise jsonschema.ValidationError if ``record`` does not follow its schema (by its command)."""
    import jsonschema

    jsonschema.validate(record, TRACK_RECORD if record.get("command") == "track" else RECORD)
