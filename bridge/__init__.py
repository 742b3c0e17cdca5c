"""The bridge between jax_impl and torch_ref: parameter conversion, flat-order permutation, weight files, metrics (import submodules)."""
