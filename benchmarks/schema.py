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
                "dataset": {"enum": ["mnist", "digits"]},
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


def validate(record: dict) -> None:
    """Raise jsonschema.ValidationError if ``record`` does not follow the schema."""
    import jsonschema

    jsonschema.validate(record, RECORD)
