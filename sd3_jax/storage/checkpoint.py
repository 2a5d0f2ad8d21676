"""Orbax checkpoints of a training run: train state + grain iterator position + config, async,
atomic, keep-N, restored straight into the current shardings (``Checkpointer``), and read-only
access to a run's weights for sampling, evaluation and export (``load_workdir``). The on-disk
layout and the guarantees are in docs/training.md.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Optional, Sequence

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

from sd3_jax import sharding
from sd3_jax.models import mmdit
from sd3_jax.storage import fileutil

STATE, DATA, CONFIG = "state", "data", "config"
COMMIT_FILE = "commit_success.txt"  # written by orbax when a step is finalised


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a pytree of jax.Arrays: a restore target."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _key_str(path) -> str:
  """'opt_state.0.mu.w': the dotted naming orbax uses for a leaf, whatever the node types."""
  parts = []
  for k in path:
    for attr in ("key", "idx", "name"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return ".".join(parts)


def _flatten(tree: Any) -> dict[str, Any]:
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
  return {_key_str(p): leaf for p, leaf in leaves}


def _listing(names, limit: int = 8) -> str:
  names = sorted(names)
  more = f" ... ({len(names) - limit} more)" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


class Checkpointer:
  """Keeps the last ``max_to_keep`` checkpoints of {state, data iterator, config} in directory.

  Multi-host: every process constructs it on the same directory (a shared file system or
  gs://) and calls save/restore with the same arguments at the same steps; each writes and
  reads only its own shards. So every leaf of the state must be a *global* jax.Array, scalars
  such as the step included (``jax.device_put(jnp.asarray(step), NamedSharding(mesh, P()))``).
  Each process saves its own iterator position: resume needs the same process count.
  """

  def __init__(
    self,
    directory: str,
    *,
    max_to_keep: int = 3,
    async_save: bool = True,
    keep_steps: Sequence[int] = (),
    read_only: bool = False,
  ):
    """``keep_steps``: steps kept whatever ``max_to_keep`` says (a cooldown branch's start);
    ``read_only``: only restore (another run's directory: nothing is created or cleaned up)."""
    self.directory = fileutil.as_epath(str(directory))
    if read_only:
      options = ocp.CheckpointManagerOptions(
        read_only=True, create=False, save_interval_steps=0, enable_async_checkpointing=False
      )
    elif keep_steps:
      policies = ocp.checkpoint_managers
      keep = policies.AnyPreservationPolicy(
        [policies.LatestN(n=max_to_keep), policies.CustomSteps(steps=[int(s) for s in keep_steps])]
      )
      options = ocp.CheckpointManagerOptions(
        preservation_policy=keep, enable_async_checkpointing=async_save, cleanup_tmp_directories=True, create=True
      )
    else:
      options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=async_save, cleanup_tmp_directories=True, create=True
      )
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=options,
      item_handlers={
        STATE: ocp.StandardCheckpointHandler(),
        DATA: grain.checkpoint.CheckpointHandler(),
        CONFIG: ocp.JsonCheckpointHandler(),
      },
    )
    stray = sorted(set(self._manager.all_steps()) - set(self.all_steps()))
    if stray:
      logging.warning("ignoring step directories without %s in %s: %s", COMMIT_FILE, self.directory, stray)

  # -- queries

  def _committed(self, step: int) -> bool:
    return (self.directory / str(step) / COMMIT_FILE).exists()

  def all_steps(self) -> list[int]:
    """Committed steps, ascending (a save still in flight is not listed until it commits)."""
    return sorted(s for s in self._manager.all_steps() if self._committed(s))

  def latest_step(self) -> Optional[int]:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def reached_preemption(self, step: int) -> bool:
    """True when jax's preemption sync point is reached at ``step`` (save with force=True)."""
    return self._manager.reached_preemption(step)

  # -- save

  def save(
    self, step: int, state: Any, data_iterator: Any = None, config: Optional[dict] = None, force: bool = False
  ) -> bool:
    """Starts an (async) save of ``state`` (a pytree of global jax.Arrays), the position of a
    grain ``data_iterator`` (DatasetIterator or DataLoaderIterator; optional) and ``config``
    (a JSON-serialisable dict, e.g. ``ConfigDict.to_dict()``; optional).

    Returns whether a save was started (orbax may skip a step unless ``force``)."""
    bad = [k for k, leaf in _flatten(state).items() if not isinstance(leaf, jax.Array)]
    if bad:
      raise TypeError(f"every state leaf must be a (global) jax.Array; not at: {_listing(bad)}")
    args = {STATE: ocp.args.StandardSave(state)}
    if data_iterator is not None:
      args[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
    if config is not None:
      try:
        json.dumps(config)
      except TypeError as e:
        raise TypeError(f"config must be JSON-serialisable: {e}") from e
      args[CONFIG] = ocp.args.JsonSave(dict(config))
    return self._manager.save(int(step), args=ocp.args.Composite(**args), force=force)

  # -- restore

  def _check_against_saved(self, step: int, abstract_state: Any):
    wanted = _flatten(abstract_state)
    unsharded = [k for k, v in wanted.items() if getattr(v, "sharding", None) is None]
    if unsharded:
      raise ValueError(
        "abstract_state leaves need a sharding (jax.ShapeDtypeStruct(shape, dtype, "
        f"sharding=...)) to restore in place; missing at: {_listing(unsharded)}"
      )
    saved = _flatten(self._manager.item_metadata(step)[STATE].tree)
    where = f"checkpoint step {step} in {self.directory}"
    missing, unexpected = set(wanted) - set(saved), set(saved) - set(wanted)
    if missing or unexpected:
      msg = [f"state structure does not match {where}:"]
      if missing:
        msg.append(f"not in the checkpoint: {_listing(missing)}")
      if unexpected:
        msg.append(f"in the checkpoint but not in abstract_state: {_listing(unexpected)}")
      raise ValueError(" ".join(msg))
    shapes = [
      f"{k} (checkpoint {tuple(saved[k].shape)}, requested {tuple(wanted[k].shape)})"
      for k in sorted(wanted)
      if tuple(saved[k].shape) != tuple(wanted[k].shape)
    ]
    if shapes:
      raise ValueError(f"state shapes do not match {where}: {_listing(shapes)}")

  def saved_config(self, step: int) -> Optional[dict]:
    """The config saved with ``step`` (None if it was saved without one), without the state."""
    if not (self.directory / str(step) / CONFIG).exists():
      return None
    return self._manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[CONFIG]

  def restore(
    self, step: Optional[int] = None, *, abstract_state: Any, data_iterator: Any = None
  ) -> tuple[Any, Optional[dict]]:
    """Restores ``step`` (default: the latest committed one) -> (state, config or None).

    ``abstract_state``: pytree of jax.ShapeDtypeStruct with shardings (the target layout).
    ``data_iterator``: a fresh grain iterator of the same pipeline; its position is set in
    place so that it continues with the element that followed the saved one.
    """
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(f"no committed checkpoint in {self.directory}")
    if step is None:
      step = steps[-1]
    elif step not in steps:
      raise FileNotFoundError(f"no committed checkpoint for step {step} in {self.directory}; available steps: {steps}")
    self._check_against_saved(step, abstract_state)
    step_dir = self.directory / str(step)
    args = {STATE: ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      if not (step_dir / DATA).exists():
        raise ValueError(
          f"checkpoint step {step} in {self.directory} has no data iterator "
          "position (saved without data_iterator); pass data_iterator=None"
        )
      args[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
    if (step_dir / CONFIG).exists():
      args[CONFIG] = ocp.args.JsonRestore()
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:
      if hasattr(e, "add_note"):
        e.add_note(f"while restoring {sorted(args)} of step {step} from {self.directory}")
      raise
    return restored[STATE], (restored[CONFIG] if CONFIG in args else None)

  # -- lifetime

  def wait_until_finished(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


# --------------------------------------------------------------------------------------------
# Reading a training workdir (sampling, evaluation, export)


def committed_steps(checkpoint_dir: str) -> list[int]:
  """Steps under checkpoint_dir whose save completed. Read-only, unlike opening a
  checkpoint.Checkpointer (which removes unfinished saves: a running trainer's)."""
  d = epath.Path(checkpoint_dir)
  if not d.exists():
    return []
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and (p / COMMIT_FILE).exists())


def load_workdir(
  workdir: str, step: Optional[int] = None, *, use_ema: bool = True, mesh=None, dtype: Optional[str] = None
):
  """(model, params, config dict, step) from a training workdir's checkpoint.

  The model is rebuilt from the checkpoint's ``config`` item (the training ConfigDict as a
  dict) with the same layout (scan_layers) and ``dtype`` (default: the config's). Only
  ``ema_params`` (``use_ema``) or ``params`` is restored, with an orbax partial restore of
  the state item, directly into the parameters' shardings on ``mesh`` (default: all devices
  on 'fsdp'); optimizer state is never read.
  """
  import ml_collections
  from flax import linen as nn

  root = fileutil.as_epath(str(workdir))  # orbax: absolute paths
  ckpt_dir = root / "checkpoints"
  steps = committed_steps(ckpt_dir)
  if not steps:
    raise FileNotFoundError(f"no committed checkpoint in {ckpt_dir}")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise FileNotFoundError(f"no committed checkpoint for step {step} in {ckpt_dir}; available: {steps}")
  step_dir = ckpt_dir / str(step)
  if not (step_dir / CONFIG).exists():
    raise FileNotFoundError(f"{step_dir} has no config item (saved without config=...); cannot rebuild the model")
  config = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(step_dir / CONFIG)
  cfg = ml_collections.ConfigDict(config)
  model = mmdit.MMDiT(
    mmdit.config_from_preset(**cfg.model),
    dtype=jnp.dtype(dtype or cfg.dtype),
    scan_layers=cfg.scan_layers,
    attention_impl=cfg.attention_impl,
  )
  mesh = mesh if mesh is not None else sharding.make_mesh()
  shapes = nn.unbox(mmdit.abstract_params(model))
  name = "ema_params" if use_ema else "params"
  restore_args = jax.tree.map(
    lambda a, s: ocp.ArrayRestoreArgs(sharding=s, global_shape=a.shape, dtype=a.dtype),
    shapes,
    sharding.logical_to_mesh_shardings(sharding.logical_specs(mmdit.abstract_params(model)), mesh),
  )
  out = ocp.PyTreeCheckpointer().restore(
    step_dir / STATE,
    args=ocp.args.PyTreeRestore(item={name: shapes}, restore_args={name: restore_args}, partial_restore=True),
  )
  return model, out[name], config, step
