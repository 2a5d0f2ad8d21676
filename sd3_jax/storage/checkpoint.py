"""Orbax checkpoints of a training run: train state + grain iterator position + config +
per-array checksums, async, atomic, keep-N, restored straight into the current shardings
(``Checkpointer``), and read-only access to a run's weights for sampling, evaluation and export
(``load_workdir``). Resuming takes the newest intact step (a damaged one is moved aside,
``restore_newest_intact``); a failed write is one line (``storage.recovery``). The on-disk
layout and the guarantees are in docs/training.md and docs/multislice.md.
"""

from __future__ import annotations

import contextlib
import json
import logging
from typing import Any, Optional, Sequence

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

from sd3_jax import sharding
from sd3_jax.models import backbones, mmdit
from sd3_jax.storage import checksums as checksums_lib
from sd3_jax.storage import fileutil, recovery

STATE, DATA, CONFIG, CHECKSUMS = "state", "data", "config", "checksums"
COMMIT_FILE = "commit_success.txt"  # written by orbax when a step is finalised


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a pytree of jax.Arrays: a restore target."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


_key_str = checksums_lib.key_name  # 'opt_state.0.mu.w': orbax's dotted naming of a leaf


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
    compress: bool = True,
    keep_steps: Sequence[int] = (),
    read_only: bool = False,
  ):
    """``keep_steps``: steps kept whatever ``max_to_keep`` says (a cooldown branch's start);
    ``read_only``: only restore (another run's directory: nothing is created or cleaned up)."""
    self.directory = fileutil.as_epath(str(directory))
    recovery.quiet_orbax_write_failures()
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
    state_handler = ocp.StandardCheckpointHandler()
    if not compress:  # orbax exposes compression on the PyTree handler the standard one wraps
      state_handler._impl = ocp.PyTreeCheckpointHandler(use_compression=False)
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=options,
      item_handlers={
        STATE: state_handler,
        DATA: grain.checkpoint.CheckpointHandler(),
        CONFIG: ocp.JsonCheckpointHandler(),
        CHECKSUMS: ocp.JsonCheckpointHandler(),
      },
    )
    self._saving: Optional[int] = None
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
    args[CHECKSUMS] = ocp.args.JsonSave(checksums_lib.checksums(state))
    with self._write_errors(int(step)):
      started = self._manager.save(int(step), args=ocp.args.Composite(**args), force=force)
    self._saving = int(step) if started else self._saving
    return started

  @contextlib.contextmanager
  def _write_errors(self, step: Optional[int]):
    """A failed write (disk full, quota, read-only or lost mount) -> one-line
    CheckpointWriteError naming the directory, its free space and the last intact step. The
    error of an async save surfaces at the next save or wait: it names the step being saved."""
    try:
      yield
    except Exception as e:
      reason = recovery.write_failure(e)
      if reason is None:
        raise
      failed = self._saving if self._saving is not None else step
      # From disk: orbax drops keep-N's victims from its own list when a save starts.
      intact = [s for s in committed_steps(self.directory) if s != failed]
      raise recovery.write_error(failed, self.directory, reason, intact[-1] if intact else None) from e

  # -- restore

  def _check_against_saved(self, step: int, abstract_state: Any):
    wanted = _flatten(abstract_state)
    unsharded = [k for k, v in wanted.items() if getattr(v, "sharding", None) is None]
    if unsharded:
      raise ValueError(
        "abstract_state leaves need a sharding (jax.ShapeDtypeStruct(shape, dtype, "
        f"sharding=...)) to restore in place; missing at: {_listing(unsharded)}"
      )
    try:
      meta = self._manager.item_metadata(step)
      tree = meta[STATE].tree
    except Exception as e:  # a missing or garbled _METADATA or manifest: the step is damaged
      missing = not (self.directory / str(step) / STATE / "_METADATA").exists()
      raise recovery.DamagedCheckpoint(
        step,
        "missing-metadata" if missing else "unreadable",
        f"{STATE}/_METADATA is missing"
        if missing
        else f"its state metadata cannot be read ({recovery.one_line(f'{type(e).__name__}: {e}', 200)})",
      ) from e
    saved = _flatten(tree)
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
    return saved

  def saved_config(self, step: int) -> Optional[dict]:
    """The config saved with ``step`` (None when it was saved without one)."""
    step_dir = self.directory / str(step)
    if not (step_dir / CONFIG).exists():
      return None
    return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(step_dir / CONFIG)

  def restore(
    self, step: Optional[int] = None, *, abstract_state: Any, data_iterator: Any = None
  ) -> tuple[Any, Optional[dict]]:
    """Restores ``step`` (default: the latest committed one) -> (state, config or None), and
    checks every array against the checksums recorded when it was saved.

    ``abstract_state``: pytree of jax.ShapeDtypeStruct with shardings (the target layout).
    ``data_iterator``: a fresh grain iterator of the same pipeline; its position is set in
    place so that it continues with the element that followed the saved one.
    Raises ``recovery.DamagedCheckpoint`` when the step cannot be read or does not match its
    checksums, and ValueError when it does not fit ``abstract_state`` (another config).
    """
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(f"no committed checkpoint in {self.directory}")
    if step is None:
      step = steps[-1]
    elif step not in steps:
      raise FileNotFoundError(f"no committed checkpoint for step {step} in {self.directory}; available steps: {steps}")
    saved = self._check_against_saved(step, abstract_state)
    step_dir = self.directory / str(step)
    # Restore in the stored dtypes (what the checksums are of), cast afterwards.
    stored = jax.tree_util.tree_map_with_path(
      lambda p, a: jax.ShapeDtypeStruct(
        a.shape, getattr(saved[_key_str(p)], "dtype", a.dtype) or a.dtype, sharding=a.sharding
      ),
      abstract_state,
    )
    args = {STATE: ocp.args.StandardRestore(stored)}
    if data_iterator is not None:
      if not (step_dir / DATA).exists():
        raise ValueError(
          f"checkpoint step {step} in {self.directory} has no data iterator "
          "position (saved without data_iterator); pass data_iterator=None"
        )
      args[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
    if (step_dir / CONFIG).exists():
      args[CONFIG] = ocp.args.JsonRestore()
    recorded = self._saved_items(step)
    if CHECKSUMS in recorded:
      args[CHECKSUMS] = ocp.args.JsonRestore()
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:
      raise recovery.classify(step, e) from e
    state = restored[STATE]
    if CHECKSUMS in args:
      differ, unlisted = checksums_lib.mismatches(state, restored[CHECKSUMS] or {})
      if differ or unlisted:
        what = (
          f"{len(differ)} array(s) differ from the checksums written with them: {_listing(differ, 4)}" if differ else ""
        )
        if unlisted:
          what += ("; " if what else "") + f"no checksum recorded for {_listing(unlisted, 4)}"
        raise recovery.DamagedCheckpoint(step, "checksum", what)
    else:
      logging.warning(
        "checkpoint step %d in %s has no checksums (written before they existed): restored without checking its arrays",
        step,
        self.directory,
      )
    casts = jax.tree.map(lambda x, a: x.dtype != a.dtype, state, abstract_state)
    if any(jax.tree.leaves(casts)):
      state = jax.tree.map(
        lambda x, a, c: jax.jit(lambda v: v.astype(a.dtype), out_shardings=a.sharding)(x) if c else x,
        state,
        abstract_state,
        casts,
      )
    return state, (restored[CONFIG] if CONFIG in args else None)

  def _saved_items(self, step: int) -> set[str]:
    """The items a step's metadata says were saved (a damaged step may have lost some)."""
    try:
      meta = json.loads((self.directory / str(step) / "_CHECKPOINT_METADATA").read_text())
      return set(meta.get("item_handlers") or {})
    except (OSError, ValueError) as e:
      raise recovery.DamagedCheckpoint(step, "missing-metadata", f"_CHECKPOINT_METADATA: {recovery.one_line(e, 200)}")

  def restore_newest_intact(self, *, abstract_state: Any, data_iterator: Any = None):
    """Restores the newest step that is intact -> (state, config or None, step), or None when
    there is no checkpoint. A damaged step is named in one warning and moved aside to
    ``<step>.damaged-<kind>`` (never deleted) before the previous one is tried; with several
    processes a step is intact only if it is for all of them. Raises
    ``recovery.NoIntactCheckpointError`` (exit 2) when checkpoints exist but none is intact."""
    steps = self.all_steps()
    damaged = []
    for i, step in enumerate(reversed(steps)):
      try:
        state, config = self.restore(step, abstract_state=abstract_state, data_iterator=data_iterator)
        error = None
      except recovery.DamagedCheckpoint as e:
        state, config, error = None, None, e
      if _all_processes_agree(error is None):
        return state, config, step
      if error is None:
        error = recovery.DamagedCheckpoint(step, "unreadable", "another process could not restore its part")
      moved = self._move_aside(step, error.kind)
      older = steps[-i - 2] if i + 1 < len(steps) else None
      logging.warning(
        "%s; moved aside to %s; %s",
        error,
        moved,
        f"trying the previous one, step {older}" if older is not None else "no older checkpoint",
      )
      damaged.append(
        f"step {step} ({error.kind.replace('-', ' ')}: {recovery.one_line(error.detail, 120)}; moved to {moved.name})"
      )
    if damaged:
      raise recovery.NoIntactCheckpointError(
        f"no intact checkpoint in {self.directory}: " + "; ".join(damaged) + ". They were moved aside, not "
        "deleted; restore a good copy or start afresh in another workdir"
      )
    return None

  def _move_aside(self, step: int, kind: str) -> epath.Path:
    if jax.process_index() == 0:
      moved = recovery.move_aside(self.directory, step, kind)
    else:
      moved = self.directory / f"{step}{recovery.DAMAGED}{kind}"
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f"sd3_jax moved aside checkpoint {step}")
    self._manager.reload()
    return moved

  # -- lifetime

  def wait_until_finished(self):
    with self._write_errors(None):
      self._manager.wait_until_finished()
    self._saving = None

  def close(self):
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _all_processes_agree(ok: bool) -> bool:
  """True when ``ok`` holds on every process (one process: ``ok``)."""
  if jax.process_count() == 1:
    return ok
  import numpy as np
  from jax.experimental import multihost_utils

  return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


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
  model = backbones.build(
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
