"""``python -m sd3_jax.evaluation``: the same as ``sd3-evaluate``."""

from sd3_jax.evaluation.evaluate import entry_point

entry_point()
