"""``python -m sd3_jax.demo``: the embedded demo end to end (see ``sd3_jax.demo.run``)."""

from sd3_jax.demo.run import entry_point

if __name__ == "__main__":
  entry_point()
