"""The warmup-stable-decay schedule against its formula at every step, for each cooldown shape,
and the checks that keep a cooldown branch an exact continuation of the run it starts from
(sd3_jax.training.branch; the branch-equals-from-scratch run is in test_scaling_sweep.py)."""

import math

import ml_collections
import numpy as np
import pytest

from sd3_jax import config as config_lib
from sd3_jax.training import optimizer
from sd3_jax.training import branch


def _opt(**kw):
  c = config_lib.base_config().optimizer
  c.update({**dict(learning_rate=3e-3, warmup_steps=10, schedule="wsd", end_lr_ratio=0.1), **kw})
  return c


def _expected(step, total, peak=3e-3, warmup=10, fraction=0.2, shape="1-sqrt", end_ratio=0.1):
  """The formula of docs/mup_wsd.md, in float64."""
  n = round(fraction * total)
  s0 = total - n
  end = end_ratio * peak
  if step < warmup:
    return peak * step / warmup
  if step < s0 or n == 0:  # no cooldown at all when round(fraction x total) is 0
    return peak
  x = (step - s0) / n
  g = {"1-sqrt": math.sqrt(x), "linear": x, "cosine": (1 - math.cos(math.pi * x)) / 2}[shape]
  return end + (peak - end) * (1 - g)


@pytest.mark.parametrize("shape", ["1-sqrt", "linear", "cosine"])
@pytest.mark.parametrize("total, fraction", [(100, 0.2), (57, 0.3), (40, 0.0)])
def test_wsd_follows_the_formula_at_every_step(shape, total, fraction):
  schedule = optimizer.learning_rate_schedule(_opt(decay_fraction=fraction, decay_shape=shape), total)
  got = np.asarray(schedule(np.arange(total + 1)))  # arrays in, as the branch check evaluates it
  want = [_expected(s, total, fraction=fraction, shape=shape) for s in range(total + 1)]
  np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-12)
  assert all(float(schedule(s)) == pytest.approx(w, rel=2e-6, abs=1e-12) for s, w in enumerate(want))  # scalars too
  n = round(fraction * total)
  if n:  # the cooldown starts at the peak and ends at end_lr_ratio x peak
    assert got[total - n] == pytest.approx(3e-3) and got[total] == pytest.approx(3e-4)


def test_wsd_before_the_cooldown_does_not_depend_on_the_length():
  """What lets a short run branch off a long one: equal values, bit for bit, before s0."""
  short, long_ = (np.asarray(optimizer.learning_rate_schedule(_opt(), t)(np.arange(1000))) for t in (500, 1000))
  s0 = 500 - round(0.2 * 500)
  assert np.array_equal(short[:s0], long_[:s0]) and short[s0 + 1] < long_[s0 + 1]


@pytest.mark.parametrize(
  "kw, total, message",
  [
    (dict(decay_shape="sqrt"), 100, "decay_shape must be one of"),
    (dict(decay_fraction=1.5), 100, r"decay_fraction must be in \[0, 1\]"),
    (dict(warmup_steps=90), 100, "runs into the WSD cooldown, which starts at step 80"),
  ],
)
def test_bad_wsd_settings_name_the_fix(kw, total, message):
  with pytest.raises(ValueError, match=message):
    optimizer.learning_rate_schedule(_opt(**kw), total)


def _run_config(**kw):
  c = config_lib.base_config()
  c.optimizer.update(dict(schedule="wsd", warmup_steps=10))
  c.update(kw)
  return c


def test_a_branch_must_continue_the_same_run():
  saved = _run_config(total_steps=1000, keep_checkpoint_steps=(400,)).to_dict()
  here = _run_config(total_steps=500, checkpoint_every=50)
  branch.check(saved, here, 400)  # a true branch passes
  with pytest.raises(ValueError, match=r"differs from the run it branches from in global_batch_size \(4096 there"):
    branch.check(saved, _run_config(total_steps=500, global_batch_size=2048), 400)
  with pytest.raises(ValueError, match="not before total_steps 400"):
    branch.check(saved, _run_config(total_steps=400), 400)
  # A cosine run of another length has another learning rate before the branch point.
  cosine = ml_collections.ConfigDict(saved)
  cosine.optimizer.schedule = "cosine"
  here_cosine = _run_config(total_steps=500)
  here_cosine.optimizer.schedule = "cosine"
  with pytest.raises(
    ValueError, match=r"learning rate before the branch point differs from that run.s \(first at step 11"
  ):
    branch.check(cosine.to_dict(), here_cosine, 400)
  with pytest.raises(ValueError, match="RUN/checkpoints/STEP"):
    branch.parse("/runs/d4_s1200/checkpoints/latest")
  both = _run_config(total_steps=500, branch_from="/runs/a/checkpoints/400", init_from="/ckpt/sd3")
  with pytest.raises(ValueError, match="branch_from and config.init_from are both set"):
    branch.start(both, abstract_state=None, data_iterator=None)
  with pytest.raises(ValueError, match="no committed checkpoint at step 400 in .*nowhere"):
    branch.start(_run_config(total_steps=500, branch_from="/nowhere/checkpoints/400"), None, None)
