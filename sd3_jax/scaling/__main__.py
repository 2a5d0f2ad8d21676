from sd3_jax.scaling.cli import entry_point

entry_point()
