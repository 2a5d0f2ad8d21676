"""Euler ODE sampling of the MM-DiT with classifier-free and skip-layer guidance, as the SD3.5
reference code (Stability-AI/sd3.5, ``sd3_infer.py``) and diffusers sample.

The reference samplers, in plain jnp and one jitted loop:

  sampling_sigmas       the shifted sigma schedule, equal to diffusers
                        ``FlowMatchEulerDiscreteScheduler(shift).set_timesteps(n).sigmas``
                        (including the shift applied twice at the low end, as both references do)
  euler_sample          x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v(x_i, sigma_i); txt2img or img2img
  guided_velocity       v_u + g (v_c - v_u) from ONE batched model call, + skip-layer guidance
  sample                all of it jitted end to end, optionally with the batch sharded on a mesh

Conventions are the trainer's: t = sigma in [0, 1], sigma = 1 is pure noise, the model
predicts v = noise - data (it multiplies sigma by 1000 inside, as the reference does).
Latents are NHWC and in the model's (normalised) space; decoding them is the caller's job.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sd3_jax import sharding
from sd3_jax.flow import solver
from sd3_jax.models import mmdit

Array = jax.Array
Cond = tuple[Array, Array]  # (context [B, L, D], pooled [B, P])


# --------------------------------------------------------------------------------------------
# Schedule


def _shift32(s, shift: float):
  """The scheduler's __init__ shift, in float32 as torch computes it."""
  s = np.float32(s)
  return np.float32(shift) * s / (np.float32(1.0) + np.float32(shift - 1.0) * s)


def sampling_sigmas(num_steps: int, shift: float = 3.0, num_train_timesteps: int = 1000) -> np.ndarray:
  """num_steps + 1 float32 sigmas from 1 down to the trailing 0, bit-equal to diffusers'
  ``FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(num_steps)`` ``.sigmas``.

  As in diffusers and the reference (sd3.5 ``sd3_infer.py`` ``get_sigmas``): the end points are
  the *already shifted* training sigmas sigma(1) = shift(1/1000) and sigma(1000) = 1 (float32),
  the timesteps are spaced linearly between them and shifted once more (float64, then cast),
  so the last nonzero sigma is shift(shift(0.001)) (0.00893 for shift 3), not 0.00299.
  """
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  if not shift > 0:
    raise ValueError(f"shift must be > 0, got {shift}")
  n_train = int(num_train_timesteps)
  sigma_min = float(_shift32(np.float32(1.0) / np.float32(n_train), shift))
  sigma_max = float(_shift32(1.0, shift))
  ts = np.linspace(sigma_max * n_train, sigma_min * n_train, num_steps)  # float64, as diffusers
  s = ts / n_train
  s = shift * s / (1 + (shift - 1) * s)
  return np.concatenate([s.astype(np.float32), np.zeros(1, np.float32)])


def img2img_start(num_steps: int, denoise: float) -> int:
  """Index of the first sigma used when only ``denoise`` of the schedule is run (sd3.5 ``sd3_infer.py``, img2img)."""
  if not 0.0 < denoise <= 1.0:
    raise ValueError(f"denoise must be in (0, 1], got {denoise}")
  start = int(num_steps * (1.0 - denoise))
  if start >= num_steps:
    raise ValueError(f"denoise {denoise} with {num_steps} steps leaves no step to run")
  return start


# --------------------------------------------------------------------------------------------
# Euler loop


def euler_sample(
  velocity_fn: Callable[[Array, Array, Array], Array],
  noise: Array,
  sigmas,
  *,
  x_init: Optional[Array] = None,
  denoise: float = 1.0,
) -> Array:
  """Integrates dx/dsigma = v from sigmas[start] down to sigmas[-1] with Euler steps.

  Args:
    velocity_fn: ``v = velocity_fn(x, sigma, step)`` with x [B, ...] float32, sigma a float32
      scalar and step the int32 index of this call (0, 1, ...; it counts calls, as the
      reference's guidance window does, also for img2img).
    noise: the Gaussian noise, [B, ...].
    sigmas: the schedule, e.g. ``sampling_sigmas(n, shift)`` (numpy or jax, length n + 1).
    x_init: img2img start latents (same shape as noise); required when denoise < 1.
    denoise: fraction of the schedule to run; starts at index ``int(n * (1 - denoise))``
      from ``x = sigma * noise + (1 - sigma) * x_init`` (pure noise for txt2img, sigma = 1).

  One ``lax.fori_loop``: jits once whatever the number of steps.
  """
  sigmas = jnp.asarray(sigmas, jnp.float32)
  n = sigmas.shape[0] - 1
  start = img2img_start(n, denoise)
  sigmas = sigmas[start:]
  noise = jnp.asarray(noise, jnp.float32)
  if x_init is None:
    if start:
      raise ValueError(f"denoise={denoise} < 1 (img2img) needs x_init")
    x = noise
  else:
    if x_init.shape != noise.shape:
      raise ValueError(f"x_init shape {x_init.shape} must equal the noise shape {noise.shape}")
    x = sigmas[0] * noise + (1.0 - sigmas[0]) * jnp.asarray(x_init, jnp.float32)

  def body(i, x):
    s, s_next = sigmas[i], sigmas[i + 1]
    return x + (s_next - s) * velocity_fn(x, s, i).astype(jnp.float32)

  return jax.lax.fori_loop(0, sigmas.shape[0] - 1, body, x)


# --------------------------------------------------------------------------------------------
# Guidance


@dataclasses.dataclass(frozen=True)
class SkipLayerGuidance:
  """Skip-layer guidance (SD3.5-medium; sd3.5 ``sd3_infer.py``): inside the window,
  ``v += scale * (v_cond - v_cond_with_layers_skipped)``.

  The window is the reference's: call i (0-based) of an n-step run is guided when
  ``start * n < i < end * n`` (strict), i.e. calls 1..5 of 28 for (0.01, 0.2).
  """

  layers: tuple[int, ...] = (7, 8, 9)
  scale: float = 2.5
  start: float = 0.01
  end: float = 0.2

  def __post_init__(self):
    object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
    if not self.layers:
      raise ValueError("skip-layer guidance needs at least one layer")
    if not 0.0 <= self.start <= self.end <= 1.0:
      raise ValueError(f"need 0 <= start <= end <= 1, got start={self.start} end={self.end}")

  def window(self, num_steps: int) -> np.ndarray:
    """bool[num_steps]: which calls are guided (computed in Python floats, as the reference)."""
    return np.array([self.start * num_steps < i < self.end * num_steps for i in range(num_steps)])


def _apply(model, params, x, sigma, cond: Cond, skip_layers=()):
  context, pooled = cond
  t = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (x.shape[0],))
  return model.apply({"params": params}, x, t, pooled, context, skip_layers=tuple(skip_layers))


def guided_velocity(
  model: mmdit.MMDiT,
  params,
  x: Array,
  sigma,
  cond: Cond,
  uncond: Optional[Cond],
  cfg_scale,
  slg: Optional[SkipLayerGuidance] = None,
  *,
  slg_active=True,
) -> Array:
  """Guided velocity at (x, sigma).

  Args:
    cond / uncond: (context [B, L, D], pooled [B, P]) of the prompt and of the negative (the
      encoded empty prompt for SD3). Both must have the same shapes. ``uncond=None``: no CFG,
      the conditional velocity only (one unbatched call; cfg_scale is ignored).
    cfg_scale: g in ``v = v_u + g (v_c - v_u)``; cond and uncond go through ONE model call
      on the concatenated batch [cond; uncond].
    slg: optional SkipLayerGuidance; needs an unscanned model (``skip_layers``).
    slg_active: bool (may be traced): whether this call is inside the SLG window. The extra
      model call runs under ``lax.cond``, so steps outside the window do not pay for it.
  """
  if uncond is None:
    v_c = _apply(model, params, x, sigma, cond)
    v = v_c
  else:
    for a, b, name in zip(cond, uncond, ("context", "pooled")):
      if a.shape != b.shape:
        raise ValueError(
          f"cond and uncond {name} shapes differ: {a.shape} vs {b.shape} (encode the "
          "negative prompt to the same token length)"
        )
    both = tuple(jnp.concatenate([c, u], 0) for c, u in zip(cond, uncond))
    v_both = _apply(model, params, jnp.concatenate([x, x], 0), sigma, both)
    v_c, v_u = jnp.split(v_both, 2, axis=0)
    v = v_u + (v_c - v_u) * cfg_scale  # the reference's order of operations
  if slg is None:
    return v
  if getattr(model, "scan_layers", False):
    raise ValueError("skip-layer guidance needs an unscanned model; use unscanned(model, params)")

  def with_slg(v):
    v_skip = _apply(model, params, x, sigma, cond, skip_layers=slg.layers)
    return v + (v_c - v_skip) * slg.scale

  return jax.lax.cond(jnp.asarray(slg_active), with_slg, lambda v: v, v)


def unscanned(model: mmdit.MMDiT, params):
  """(model, params) in the unscanned layout (what skip-layer guidance needs)."""
  if not model.scan_layers:
    return model, params
  return model.clone(scan_layers=False), mmdit.unstack_block_params(params, model.config)


# --------------------------------------------------------------------------------------------
# End-to-end sampler


def example_noise(rng: Array, batch: int, latent_shape: Sequence[int]) -> Array:
  """Noise of example i drawn from ``fold_in(rng, i)``: an image depends on its index and the
  seed only, not on the batch size or the padding added for the mesh."""
  keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(batch))
  return jax.vmap(lambda k: jax.random.normal(k, tuple(latent_shape), jnp.float32))(keys)


@functools.lru_cache(maxsize=16)
def _sampler(model, mesh, latent_shape, slg, use_cfg, rectified=True):
  def fn(params, context, pooled, neg_context, neg_pooled, x_init, rng, steps, slg_window, cfg_scale):
    m, p = unscanned(model, params) if slg is not None else (model, params)
    b = context.shape[0]
    noise = example_noise(rng, b, latent_shape)
    if mesh is not None:
      noise = jax.lax.with_sharding_constraint(noise, sharding.batch_sharding(mesh, noise.ndim))
    cond = (context, pooled)
    uncond = (neg_context, neg_pooled) if use_cfg else None

    def velocity(x, sigma, i):  # the guided network output at (input x, time input sigma)
      active = slg_window[i] if slg is not None else False
      return guided_velocity(m, p, x, sigma, cond, uncond, cfg_scale, slg, slg_active=active)

    # The steps arrive already cut at the img2img start, so the whole of them is run.
    if rectified:
      return euler_sample(velocity, noise, steps, x_init=x_init)
    # txt2img: noise at the first level's scale; img2img: alpha x_init + sigma noise there
    on_x, on_noise = steps["start"][0], steps["start"][1]
    z = on_noise * noise if x_init is None else on_x * x_init + on_noise * noise
    return solver.integrate(velocity, z, **{k: v for k, v in steps.items() if k != "start"})

  if mesh is None:
    return jax.jit(fn)

  def fn_mesh(*args):
    with sharding.logical_axes(mesh):
      return fn(*args)

  # Replicated output: the latents are small, and every process can read (decode, save) them.
  return jax.jit(fn_mesh, out_shardings=sharding.replicated(mesh))


@functools.lru_cache(maxsize=16)
def param_shardings(model: mmdit.MMDiT, mesh):
  """NamedShardings of the model's parameters on ``mesh`` (the trainer's logical rules)."""
  return sharding.logical_to_mesh_shardings(sharding.logical_specs(mmdit.abstract_params(model)), mesh)


def _pad_batch(x, n):
  """Repeats the last row so that the batch has n rows (n >= len(x))."""
  x = jnp.asarray(x)
  if x.shape[0] == n:
    return x
  return jnp.concatenate([x, jnp.repeat(x[-1:], n - x.shape[0], axis=0)], 0)


def sample(
  model: mmdit.MMDiT,
  params,
  context,
  pooled,
  neg_context=None,
  neg_pooled=None,
  *,
  rng: Array,
  latent_shape: Sequence[int],
  num_steps: int = 28,
  shift: float = 3.0,
  cfg_scale: float = 7.0,
  slg: Optional[SkipLayerGuidance] = None,
  mesh=None,
  x_init=None,
  denoise: float = 1.0,
  formulation=None,
) -> Array:
  """Samples latents [B, *latent_shape] (float32) for B prompts, jitted end to end.

  Args:
    context / pooled: the prompts' conditioning [B, L, D] / [B, P].
    neg_context / neg_pooled: the negative (SD3: the encoded empty prompt), with batch B or 1
      (broadcast). None: no CFG (one model call per step; the reference's cfg 1).
    rng: key for the noise; example i uses ``fold_in(rng, i)`` (see ``example_noise``).
    latent_shape: (H, W, C) of one latent (pixels / 8 and 16 channels for SD3).
    num_steps, shift: the schedule (``sampling_sigmas``); cfg_scale: the CFG weight g.
    slg: optional SkipLayerGuidance (a scanned model is unstacked inside the jit for it).
    mesh: shard the batch over the mesh's batch axes ('data', 'fsdp') and the parameters by
      the trainer's logical rules (a no-op for parameters already placed that way). The batch
      is padded to a multiple of the batch shards and the padding dropped afterwards; the
      returned latents are replicated (readable on every process).
    x_init, denoise: img2img (see ``euler_sample``); x_init [B, *latent_shape].
    formulation: a ``flow`` formulation (None: rectified flow). Rectified flow runs the
      reference's Euler sampler above; every other formulation the same kind of step in its own
      parametrisation on its native schedule (``flow.solver``: DDIM for eps/v, Karras' Euler
      for EDM), shifted by the log-SNR -2 log(shift). Guidance combines the network outputs.

  The compiled sampler is cached per (model, mesh, slg, shapes, number of steps run,
  rectified or not); changing cfg_scale, shift, seed, the prompts or the formulation's
  schedule does not recompile.
  """
  latent_shape = tuple(int(s) for s in latent_shape)
  context, pooled = jnp.asarray(context), jnp.asarray(pooled)
  b = context.shape[0]
  if pooled.shape[0] != b:
    raise ValueError(f"context batch {b} != pooled batch {pooled.shape[0]}")
  if (neg_context is None) != (neg_pooled is None):
    raise ValueError("give both neg_context and neg_pooled, or neither (no CFG)")
  use_cfg = neg_context is not None
  if use_cfg:
    neg_context, neg_pooled = jnp.asarray(neg_context), jnp.asarray(neg_pooled)
    if neg_context.shape[0] == 1 and b > 1:
      neg_context = jnp.broadcast_to(neg_context, (b,) + neg_context.shape[1:])
      neg_pooled = jnp.broadcast_to(neg_pooled, (b,) + neg_pooled.shape[1:])
  rectified = formulation is None or formulation.is_rectified
  start = img2img_start(num_steps, denoise)
  if rectified:
    steps = jnp.asarray(sampling_sigmas(num_steps, shift)[start:])
  else:
    sched = solver.ode_schedule(formulation, num_steps, shift)
    steps = {k: jnp.asarray(v) for k, v in sched.arrays(start).items()}
    on_noise = sched.start_noise_scale(start) if x_init is None else sched.sigma[start]
    steps["start"] = jnp.asarray([sched.alpha[start], on_noise], jnp.float32)
  if x_init is not None:
    x_init = jnp.asarray(x_init, jnp.float32)
    if x_init.shape != (b,) + latent_shape:
      raise ValueError(f"x_init must have shape {(b,) + latent_shape}, got {x_init.shape}")
  elif start:
    raise ValueError(f"denoise={denoise} < 1 (img2img) needs x_init")
  window = slg.window(num_steps) if slg is not None else np.zeros(num_steps, bool)

  n = b
  if mesh is not None:
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    n = -(-b // shards) * shards
    params = jax.device_put(params, param_shardings(model, mesh))
  batch = [context, pooled] + ([neg_context, neg_pooled] if use_cfg else [None, None]) + [x_init]
  batch = [None if a is None else _pad_batch(a, n) for a in batch]
  if mesh is not None:
    batch = [None if a is None else jax.device_put(a, sharding.batch_sharding(mesh, a.ndim)) for a in batch]
  fn = _sampler(model, mesh, latent_shape, slg, use_cfg, rectified)
  out = fn(params, *batch, rng, steps, jnp.asarray(window), jnp.asarray(cfg_scale, jnp.float32))
  return out[:b] if n != b else out
