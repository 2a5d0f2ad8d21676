"""Training metrics: MFU, clu metric collections, the step timer and the progress line
(their writers are ``training.writers``).

The model-FLOP count itself lives beside the model (``sd3_jax.models.flops``).

* ``peak_flops_per_device``: dense bf16 peak per chip, from ``device.device_kind``.
* ``TrainMetrics``: a ``clu.metrics.Collection`` built inside the jitted train step (loss,
  grad norm, learning rate, loss per bucket of t) and merged on the host.
* ``StepTimer`` and ``format_progress``: throughput, MFU and a one-line console report.

No ``from __future__ import annotations`` here: clu reads ``Collection.__annotations__`` as
metric classes, which postponed annotations would turn into strings.
"""

import contextlib
import re
import time
from typing import Any, Callable, Mapping, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics as clu_metrics

# --------------------------------------------------------------------------------------------
# Peak FLOP/s per chip

# Dense (no sparsity) bf16 peak per chip, matched in order on jax's device.device_kind
# (lower-cased). TPU: Google Cloud TPU system-architecture pages; NVIDIA: datasheets (the
# "with sparsity" figures halved). GH200 matches h200 below; its GPU has the same 989e12.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
  (r"^tpu v4$", 275e12),
  (r"^tpu v5( lite|e)$", 197e12),
  (r"^tpu v5p?$", 459e12),
  (r"^tpu v6( lite|e)$", 918e12),
  (r"h100.*pcie", 756e12),
  (r"h100 nvl", 835e12),
  (r"h100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
  (r"h200", 989e12),
  (r"a100", 312e12),
)


def peak_flops_per_device(device_kind: str, override: Optional[float] = None) -> Optional[float]:
  """Peak dense bf16 FLOP/s of one chip, or None when unknown (CPU, other chips).

  ``override`` (e.g. from the config, or a measured matmul ceiling) wins when given. MFU is
  reported as null rather than guessed when this returns None.
  """
  if override is not None:
    if override <= 0:
      raise ValueError(f"peak FLOP/s override must be positive, got {override}")
    return float(override)
  kind = device_kind.strip().lower()
  for pattern, peak in PEAK_BF16_FLOPS:
    if re.search(pattern, kind):
      return peak
  return None


# --------------------------------------------------------------------------------------------
# clu metrics (built inside jit, merged and computed on the host)

NUM_T_BUCKETS = 10  # equal-width buckets of t in [0, 1]


@flax.struct.dataclass
class TBucketLoss(clu_metrics.Metric):
  """Mean per-example loss in each of NUM_T_BUCKETS equal buckets of t (t=1 goes in the last).

  compute() -> [NUM_T_BUCKETS] means, NaN where a bucket saw no example.
  """

  total: jax.Array  # [NUM_T_BUCKETS] float32 sums
  count: jax.Array  # [NUM_T_BUCKETS] int32

  @classmethod
  def empty(cls) -> "TBucketLoss":
    return cls(total=jnp.zeros((NUM_T_BUCKETS,), jnp.float32), count=jnp.zeros((NUM_T_BUCKETS,), jnp.int32))

  @classmethod
  def from_model_output(cls, per_example_loss: jax.Array, t: jax.Array, **_) -> "TBucketLoss":
    if per_example_loss.shape != t.shape or per_example_loss.ndim != 1:
      raise ValueError(f"per_example_loss {per_example_loss.shape} and t {t.shape} must both be [B]")
    idx = jnp.clip(jnp.floor(t.astype(jnp.float32) * NUM_T_BUCKETS), 0, NUM_T_BUCKETS - 1)
    onehot = jax.nn.one_hot(idx.astype(jnp.int32), NUM_T_BUCKETS, dtype=jnp.float32)  # [B, n]
    loss = per_example_loss.astype(jnp.float32)[:, None]
    return cls(total=jnp.sum(onehot * loss, axis=0), count=jnp.sum(onehot, axis=0).astype(jnp.int32))

  def merge(self, other: "TBucketLoss") -> "TBucketLoss":
    return type(self)(total=self.total + other.total, count=self.count + other.count)

  def compute(self) -> jax.Array:
    return jnp.where(self.count > 0, self.total / jnp.maximum(self.count, 1), jnp.nan)


def t_bucket_names(n: int = NUM_T_BUCKETS) -> list[str]:
  return [f"loss_t/{i / n:.1f}-{(i + 1) / n:.1f}" for i in range(n)]


@flax.struct.dataclass
class TrainMetrics(clu_metrics.Collection):
  """Per-step training metrics.

  In the train step (inside jit):
    TrainMetrics.single_from_model_output(per_example_loss=[B], t=[B], grad_norm=(),
                                          learning_rate=())
  On the host: ``acc = m if acc is None else acc.merge(m)`` over a logging window, then
  ``acc.compute()`` -> {'loss', 'grad_norm' (window means), 'learning_rate' (last value),
  'loss_t/0.0-0.1', ...} as python floats. Empty t-buckets are omitted from the dict.
  """

  loss: clu_metrics.Average.from_output("per_example_loss")
  grad_norm: clu_metrics.Average.from_output("grad_norm")
  learning_rate: clu_metrics.LastValue.from_output("learning_rate")
  loss_t: TBucketLoss

  def compute(self) -> dict[str, float]:  # host-side: returns python floats
    out = {}
    for name, value in jax.device_get(super().compute()).items():
      if name == "loss_t":
        out.update({k: float(v) for k, v in zip(t_bucket_names(), value) if not np.isnan(v)})
      else:
        out[name] = float(value)
    return out


# --------------------------------------------------------------------------------------------
# Throughput and progress


class StepTimer:
  """Throughput between successive ``tick(step)`` calls.

  The first tick only starts the clock (so compilation is excluded). Each later tick returns
  the averages over the steps since the previous tick:
    step_time (s), images_per_sec, tflops_per_sec (all devices), tflops_per_sec_per_device,
    mfu = achieved FLOP/s / (peak_flops_per_device * num_devices), None if the peak is unknown.
  Time spent inside ``with timer.paused():`` (checkpointing, evaluation) is excluded. Dispatch
  is asynchronous: tick after something that waits for the step (e.g. fetching its metrics).
  """

  def __init__(
    self,
    *,
    flops_per_step: float,
    images_per_step: int,
    num_devices: int,
    peak_flops_per_device: Optional[float] = None,
    clock: Callable[[], float] = time.perf_counter,
  ):
    if num_devices < 1:
      raise ValueError(f"num_devices must be >= 1, got {num_devices}")
    self.flops_per_step = float(flops_per_step)
    self.images_per_step = images_per_step
    self.num_devices = num_devices
    self.peak_flops_per_device = peak_flops_per_device
    self._clock = clock
    self._last: Optional[tuple[int, float]] = None
    self._paused_total = 0.0
    self._excluded_steps = 0

  @contextlib.contextmanager
  def paused(self, steps: int = 0):
    """Excludes the time inside (and ``steps`` steps, e.g. one that compiles) from the averages."""
    self._excluded_steps += steps
    start = self._clock()
    try:
      yield
    finally:
      self._paused_total += self._clock() - start

  def tick(self, step: int, flops: Optional[float] = None) -> dict[str, Optional[float]]:
    """``flops``: the model FLOPs of the steps since the last tick when they differ from step
    to step (aspect buckets); default flops_per_step per step."""
    now = self._clock()
    last, self._last = self._last, (step, now)
    paused, self._paused_total = self._paused_total, 0.0
    excluded, self._excluded_steps = self._excluded_steps, 0
    if last is None or step - last[0] - excluded <= 0:
      return {}
    steps = step - last[0] - excluded
    elapsed = max(now - last[1] - paused, 1e-9)
    flops_per_sec = (self.flops_per_step * steps if flops is None else float(flops)) / elapsed
    peak = self.peak_flops_per_device
    return {
      "step_time": elapsed / steps,
      "images_per_sec": self.images_per_step * steps / elapsed,
      "tflops_per_sec": flops_per_sec / 1e12,
      "tflops_per_sec_per_device": flops_per_sec / self.num_devices / 1e12,
      "mfu": None if peak is None else flops_per_sec / (peak * self.num_devices),
    }


def _format_duration(seconds: float) -> str:
  seconds = int(round(seconds))
  d, rem = divmod(seconds, 86400)
  h, rem = divmod(rem, 3600)
  m, s = divmod(rem, 60)
  if d:
    return f"{d}d{h:02d}h"
  if h:
    return f"{h}h{m:02d}m"
  return f"{m}m{s:02d}s"


def _format_flops(tflops: float) -> str:
  """FLOP/s in the largest unit that keeps the figure at 1 or more (a CPU does GFLOP/s)."""
  for scale, unit in ((1.0, "TFLOP/s"), (1e-3, "GFLOP/s"), (1e-6, "MFLOP/s")):
    if tflops >= scale:
      break
  return f"{unit}/dev {tflops / scale:.1f}"


_PROGRESS_FIELDS: tuple[tuple[str, str, Callable[[float], str]], ...] = (
  ("loss", "loss", lambda v: f"{v:.4f}"),
  ("val/loss", "val_loss", lambda v: f"{v:.4f}"),
  ("grad_norm", "grad_norm", lambda v: f"{v:.3g}"),
  ("learning_rate", "lr", lambda v: f"{v:.2e}"),
  ("step_time", "step", lambda v: f"{v:.3g}s"),
  ("images_per_sec", "img/s", lambda v: f"{v:.1f}"),
  ("tflops_per_sec_per_device", "", _format_flops),
  ("mfu", "MFU", lambda v: f"{100 * v:.1f}%"),
)


def format_progress(step: int, total_steps: int, metrics: Mapping[str, Any]) -> str:
  """One console line, e.g.
  ``step 1200/500000 (0.2%) | loss 0.4312 | lr 1.00e-04 | step 0.52s | MFU 41.3% | ETA 3d00h``;
  for validation rows ``step 300/1200 (25.0%) | val_loss 0.2690``. Missing or None fields are
  left out; ETA needs ``step_time``; FLOP/s per device in T, G or M, whichever shows the figure."""
  parts = [f"step {step}/{total_steps} ({100 * step / max(total_steps, 1):.1f}%)"]
  for key, label, fmt in _PROGRESS_FIELDS:
    value = metrics.get(key)
    if value is not None:
      parts.append(f"{label} {fmt(float(value))}".strip())
  step_time = metrics.get("step_time")
  if step_time is not None and total_steps > step:
    parts.append(f"ETA {_format_duration(float(step_time) * (total_steps - step))}")
  return " | ".join(parts)
