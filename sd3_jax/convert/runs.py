"""Export from a training run: a workdir (its latest committed checkpoint) or one step
directory ``WORKDIR/checkpoints/STEP`` as a conversion source, so a run ends in a file that
diffusers or the original SD3 code loads (``--src WORKDIR --to diffusers [--ema|--no-ema]``).

The model is rebuilt from the checkpoint's own config; the EMA weights (default) or the raw
parameters are restored without the optimizer state (``checkpoint.load_workdir``) and
unscanned when the run used scanned layers. Unlike the streamed conversions, the chosen
weights are held in host memory once (4 bytes per parameter in float32).
"""

from __future__ import annotations

from typing import Optional

from etils import epath

from sd3_jax.convert import mmdit_keys
from sd3_jax.convert.formats import Source, source_from_params

CHECKPOINTS = "checkpoints"


def _path(path) -> epath.Path:
  p = epath.Path(path)
  return p if "://" in str(p) else epath.Path(str(p)).resolve()


def run_location(path) -> Optional[tuple[str, Optional[int]]]:
  """(workdir, step or None for the latest) when ``path`` is a training workdir (it has
  checkpoints/) or one of its step directories (checkpoints/<step>); otherwise None."""
  p = _path(path)
  if not p.is_dir():
    return None
  if (p / CHECKPOINTS).is_dir():
    return str(p), None
  if p.name.isdigit() and p.parent.name == CHECKPOINTS:
    return str(p.parent.parent), int(p.name)
  return None


def load_run(path, *, use_ema: bool = True):
  """(model config, EMA (``use_ema``) or raw parameters, description) of a run's checkpoint."""
  from sd3_jax.storage import checkpoint  # jax/orbax only when a run is exported

  location = run_location(path)
  if location is None:
    raise ValueError(
      f"{path} is not a training workdir (no {CHECKPOINTS}/) nor a {CHECKPOINTS}/<step> directory of one"
    )
  workdir, step = location
  model, params, _, step = checkpoint.load_workdir(workdir, step, use_ema=use_ema, dtype="float32")
  return model.config, params, f"{'EMA' if use_ema else 'raw'} parameters of step {step} of the run {workdir}"


def open_run(path, *, use_ema: bool = True) -> Source:
  """The EMA (``use_ema``) or raw parameters of a run's checkpoint (an MM-DiT's) as a 'jax' Source."""
  config, params, description = load_run(path, use_ema=use_ema)
  mmdit_keys.require_mmdit(config, description)
  source = source_from_params(params, config)
  source.description = description
  return source
