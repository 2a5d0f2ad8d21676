"""python -m tools.convert_weights --src SRC --dst DST --to {jax,diffusers,sd3,transformers} (--help)."""

from sd3_jax.convert.cli import entry_point

if __name__ == "__main__":
  entry_point()
