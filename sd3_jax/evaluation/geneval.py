"""Samples for GenEval (Ghosh et al. 2023; github.com/djghosh13/geneval), written in the folder
layout its scorer ``evaluation/evaluate_images.py`` reads, so GenEval runs unchanged on them
(it needs PyTorch detection models; we do not reimplement it):

  OUTDIR/<index:05d>/metadata.jsonl   the prompt's metadata line, one JSON object (json.load)
  OUTDIR/<index:05d>/samples/<j:05d>.png   num_per_prompt samples (names matching \\d+\\.png)

as GenEval's own ``generation/diffusers_generate.py`` writes them (its optional grid.png is not
needed by the scorer). The metadata file is GenEval's ``prompts/evaluation_metadata.jsonl``
(553 prompts with ``tag``, ``include``, ``exclude`` and ``prompt``); GenEval samples 4 images
per prompt.

Resumable: prompts are sampled in fixed chunks (chunk c uses seed + c), a prompt folder is
renamed into place only when all its samples are written, and chunks whose prompts are all
present are skipped.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from sd3_jax.inference import generation


def read_metadata(path: str) -> list[dict]:
  """GenEval's prompt metadata JSONL: one object with a "prompt" string per line."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no GenEval metadata file {path} (GenEval's prompts/evaluation_metadata.jsonl)")
  out = []
  with open(path) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        d = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n} is not JSON: {e}") from None
      if not isinstance(d, dict) or not isinstance(d.get("prompt"), str):
        raise ValueError(f'{path}:{n} has no "prompt" string; expected GenEval\'s evaluation_metadata.jsonl')
      out.append(d)
  if not out:
    raise ValueError(f"{path} holds no prompts")
  return out


def _done(outdir: str, index: int, num_per_prompt: int) -> bool:
  samples = os.path.join(outdir, f"{index:05d}", "samples")
  return os.path.isdir(samples) and all(
    os.path.isfile(os.path.join(samples, f"{j:05d}.png")) for j in range(num_per_prompt)
  )


def _write_prompt(outdir: str, index: int, metadata: dict, images: np.ndarray) -> None:
  from PIL import Image

  final = os.path.join(outdir, f"{index:05d}")
  tmp = f"{final}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(os.path.join(tmp, "samples"))
  with open(os.path.join(tmp, "metadata.jsonl"), "w") as f:
    json.dump(metadata, f)
  for j, im in enumerate(images):
    Image.fromarray(im).save(os.path.join(tmp, "samples", f"{j:05d}.png"))
  if os.path.exists(final):
    shutil.rmtree(final)
  os.replace(tmp, final)


def export(
  model,
  params,
  conditioner,
  metadata: Sequence[dict],
  outdir: str,
  *,
  latent_shape: Sequence[int],
  num_per_prompt: int = 4,
  prompts_per_batch: int = 4,
  decoder: Optional[Callable] = None,
  num_steps: int = 28,
  cfg_scale: float = 7.0,
  shift: float = 3.0,
  seed: int = 0,
  mesh=None,
  progress: bool = False,
  formulation=None,
) -> int:
  """Samples every prompt of ``metadata`` (module docstring); returns the number of prompts
  sampled now (those already complete are skipped). Every process samples; process 0 writes.
  ``formulation``: what the model was trained with (None: rectified flow)."""
  if num_per_prompt < 1 or prompts_per_batch < 1:
    raise ValueError("num_per_prompt and prompts_per_batch must be >= 1")
  primary = jax.process_index() == 0
  if primary:
    os.makedirs(outdir, exist_ok=True)
  chunks = [
    list(range(a, min(a + prompts_per_batch, len(metadata)))) for a in range(0, len(metadata), prompts_per_batch)
  ]
  bar = None
  if progress and primary:
    from tqdm import tqdm

    bar = tqdm(total=len(metadata), desc="geneval", unit="prompt")
  done = np.array([_done(outdir, i, num_per_prompt) if primary else False for i in range(len(metadata))])
  if jax.process_count() > 1:  # process 0's view of the files decides, also without a shared disk
    from jax.experimental import multihost_utils

    done = np.asarray(multihost_utils.broadcast_one_to_all(done))
  sampled = 0
  for c, idx in enumerate(chunks):
    if done[idx].all():
      if bar is not None:
        bar.update(len(idx))
      continue
    images = generation.generate(
      model,
      params,
      conditioner,
      [metadata[i]["prompt"] for i in idx],
      latent_shape=latent_shape,
      decoder=decoder,
      num_per_prompt=num_per_prompt,
      num_steps=num_steps,
      shift=shift,
      cfg_scale=cfg_scale,
      seed=seed + c,
      mesh=mesh,
      formulation=formulation,
    )
    if primary:
      for k, i in enumerate(idx):
        _write_prompt(outdir, i, metadata[i], images[k * num_per_prompt : (k + 1) * num_per_prompt])
    sampled += len(idx)
    if bar is not None:
      bar.update(len(idx))
  if bar is not None:
    bar.close()
  return sampled
