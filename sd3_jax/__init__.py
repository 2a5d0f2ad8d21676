"""sd3_jax: Stable Diffusion 3 / 3.5 (MM-DiT, rectified flow) in JAX/Flax.

``import sd3_jax`` stays cheap (no jax import); the checkpoint helpers load on first use:

  model, params = sd3_jax.load_pretrained("ckpt/sd3m")          # see sd3_jax/pretrained.py
  sd3_jax.save_pretrained("ckpt/mine", params, model.config)

``load_pretrained`` reads any of our checkpoint directories and returns the matching module:
MMDiT (format sd3_jax.mmdit), CLIPTextEncoder (sd3_jax.clip_text), T5Encoder
(sd3_jax.t5_encoder) or AutoencoderKL (sd3_jax.vae). Text conditioning for sampling:
``sd3_jax.text_conditioning.SD3TextConditioner.from_pretrained(DIR)``.
"""

__all__ = ["load_pretrained", "save_pretrained"]


def __getattr__(name):
  if name in __all__:
    from sd3_jax.storage import pretrained

    return getattr(pretrained, name)
  raise AttributeError(f"module 'sd3_jax' has no attribute {name!r}")
