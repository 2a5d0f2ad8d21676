"""The trainer's periodic sample grids encode their fixed prompts once at start-up and drop the
text encoders, instead of holding them (a T5-XXL) for the whole run."""

import gc
import weakref

import numpy as np

from configs import tiny
from sd3_jax.inference import generation
from sd3_jax import text_conditioning
from sd3_jax.training import train


def test_prompts_are_encoded_once_and_the_encoders_freed(tmp_path, monkeypatch):
  c = tiny.get_config()
  c.total_steps, c.log_every, c.checkpoint_every = 2, 1, 2
  c.val.every = 0
  c.model.in_channels = c.model.out_channels = c.data.latent_channels = 3
  c.sample.update(
    dict(every=1, prompts=("a", "b"), num_steps=2, pixel_space=True, text_encoders="unused", cfg_scale=2.0)
  )
  encoders = []

  class Encoders:  # what load_conditioner returns: big models with encode()/encode_empty()
    def __init__(self):
      self.calls = []

    def encode(self, prompts):
      self.calls.append(list(prompts))
      n = len(prompts)
      return (
        np.full((n, c.data.context_len, c.data.context_dim), 0.1, np.float32),
        np.full((n, c.data.pooled_dim), 0.1, np.float32),
      )

    def encode_empty(self):
      self.calls.append([""])
      return np.zeros((1, c.data.context_len, c.data.context_dim), np.float32), np.zeros((1, 32), np.float32)

  calls = []

  def load(path, **kw):
    e = Encoders()
    encoders.append(weakref.ref(e))
    calls.append(e.calls)
    return e

  alive_at_sampling = []
  real = generation.write_sample_grid

  def write(*args, **kwargs):
    gc.collect()
    alive_at_sampling.append(encoders[0]() is not None)
    return real(*args, **kwargs)

  monkeypatch.setattr(text_conditioning, "load_conditioner", load)
  monkeypatch.setattr(generation, "write_sample_grid", write)
  train.train_and_evaluate(c, str(tmp_path))
  assert len(encoders) == 1 and calls[0] == [["a", "b"], [""]]  # once: the prompts and the negative
  assert alive_at_sampling == [False, False]  # no encoder is held while the run trains and samples
  assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step_00000001.png", "step_00000002.png"]
