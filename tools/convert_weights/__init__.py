"""``python -m tools.convert_weights``: the repository's converter command, a thin wrapper over the
installed library's ``sd3_jax.convert`` (the same as ``sd3-convert``)."""
