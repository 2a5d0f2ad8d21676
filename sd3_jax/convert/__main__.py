"""``python -m sd3_jax.convert``: the converter command (see ``sd3_jax.convert.cli``)."""

from sd3_jax.convert.cli import entry_point

if __name__ == "__main__":
  entry_point()
