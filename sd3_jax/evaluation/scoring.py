"""Evaluate a text-to-image model: sample images for prompts with our sampler, then CLIP score
and FID on CLIP features against reference statistics. The ``sd3-evaluate`` command and the
trainer's periodic evaluation (``config.eval``) both call ``evaluate``.

  evaluate(model, params, conditioner, prompts, clip=CLIPFeatures, [fid_clip=CLIPFeatures,]
           reference=load_stats(...),
           num_images=N, batch_size=B, latent_shape=..., decoder=..., num_steps, cfg_scale,
           shift, seed, mesh) -> EvalResult(metrics, grid_images, stats)

Image i is sampled for ``prompts[i % len(prompts)]``. Images are generated ``batch_size`` at a
time (batch k with seed ``seed + k``; within it image j uses noise fold_in(key(seed + k), j)),
so the images depend on (seed, batch_size). Every process runs the same sampler over the mesh
and gets the same images; the CLIP features are split over the mesh and the statistics merged
across processes in float64.

Metrics (``EvalResult.metrics``):
  clip_score   mean over images of 100 * max(cos(CLIP image, CLIP text), 0)
  fid_clip     Frechet distance between the CLIP features of the samples and the reference
               statistics (only with ``reference``)
  num_images
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from sd3_jax.inference import generation
from sd3_jax.evaluation import stats as stats_lib
from sd3_jax.evaluation.clip_metrics import CLIPFeatures


@dataclasses.dataclass
class EvalResult:
  metrics: dict[str, Any]
  grid_images: np.ndarray  # the first ``grid_size`` images, uint8 [n, h, w, 3]
  stats: stats_lib.FeatureStats  # of the samples' CLIP features, merged over processes


def check_reference(reference: dict, clip: CLIPFeatures) -> None:
  """Reference statistics must come from the same CLIP and preprocessing as ours."""
  mu = reference["mu"]
  if mu.shape != (clip.model.config.projection_dim,):
    raise ValueError(
      f"reference statistics have {mu.shape[0]}-d features but the CLIP model gives "
      f"{clip.model.config.projection_dim}-d ones; compute them with the same CLIP checkpoint"
    )
  theirs = reference.get("feature_extractor") or {}
  for key in ("config", "crop_rounding", "image_size"):
    if key in theirs and theirs[key] != clip.description.get(key):
      raise ValueError(
        f"reference statistics were computed with a different CLIP setting {key!r} "
        f"({theirs[key]!r}, here {clip.description.get(key)!r}); recompute them with "
        "`python -m sd3_jax.evaluation.reference_stats` and the same CLIP checkpoint"
      )


def expand_prompts(prompts: Sequence[str], num_images: Optional[int]) -> list[str]:
  if not prompts:
    raise ValueError("no prompts")
  n = len(prompts) if num_images is None else int(num_images)
  if n < 2:
    raise ValueError(f"need at least 2 images for the feature covariance, got num_images={n}")
  return [prompts[i % len(prompts)] for i in range(n)]


def evaluate(
  model,
  params,
  conditioner,
  prompts: Sequence[str],
  *,
  clip: CLIPFeatures,
  fid_clip: Optional[CLIPFeatures] = None,
  latent_shape: Sequence[int],
  reference: Optional[dict] = None,
  num_images: Optional[int] = None,
  batch_size: int = 16,
  decoder: Optional[Callable] = None,
  num_steps: int = 28,
  cfg_scale: float = 7.0,
  shift: float = 3.0,
  seed: int = 0,
  mesh=None,
  grid_size: int = 16,
  progress: bool = False,
  on_batch: Optional[Callable[[int, np.ndarray, list], None]] = None,
  formulation=None,
) -> EvalResult:
  """Samples ``num_images`` images (default: one per prompt) and scores them (module docstring).

  ``on_batch(start, images, prompts)`` is called on every process with each generated batch
  (e.g. to write the images). ``fid_clip`` (default ``clip``) gives the FID features.
  ``formulation``: what the model was trained with (None: rectified flow)."""
  items = expand_prompts(prompts, num_images)
  clip.tokenize(items[:1])  # no tokenizer: fail before sampling anything
  fid_clip = fid_clip or clip
  if reference is not None:
    check_reference(reference, fid_clip)
  feats = stats_lib.FeatureStats(fid_clip.model.config.projection_dim)
  score_sum, score_count = 0.0, 0
  grid = []
  bar = None
  if progress and jax.process_index() == 0:
    from tqdm import tqdm

    bar = tqdm(total=len(items), desc="evaluate", unit="img")
  for k, start in enumerate(range(0, len(items), batch_size)):
    batch_prompts = items[start : start + batch_size]
    images = generation.generate(
      model,
      params,
      conditioner,
      batch_prompts,
      latent_shape=latent_shape,
      decoder=decoder,
      num_steps=num_steps,
      shift=shift,
      cfg_scale=cfg_scale,
      seed=seed + k,
      mesh=mesh,
      formulation=formulation,
    )
    if on_batch is not None:
      on_batch(start, images, batch_prompts)
    scores = clip.clip_scores(images, batch_prompts)
    score_sum += float(np.sum(scores.values, dtype=np.float64))
    score_count += len(scores.values)
    feats.update(fid_clip.image_features(images).values)
    if len(grid) < grid_size:
      grid.extend(images[: grid_size - len(grid)])
    if bar is not None:
      bar.update(len(batch_prompts))
  if bar is not None:
    bar.close()
  total = stats_lib.all_reduce_sum(np.array([score_sum, score_count], np.float64))
  merged = feats.all_reduce()
  if merged.count != len(items) or int(total[1]) != len(items):
    raise RuntimeError(f"internal error: {merged.count} features and {int(total[1])} scores for {len(items)} images")
  metrics = {"clip_score": float(total[0] / total[1]), "num_images": len(items)}
  if reference is not None:
    metrics["fid_clip"] = stats_lib.frechet_distance(merged.mean, merged.cov, reference["mu"], reference["sigma"])
  return EvalResult(metrics, np.stack(grid), merged)


def reference_statistics(clip: CLIPFeatures, paths: Sequence[str], *, progress: bool = False) -> stats_lib.FeatureStats:
  """CLIP-feature statistics of real images (files readable by PIL, converted to RGB), read
  ``clip.batch_size`` at a time on every process; merged over processes."""
  from PIL import Image

  if len(paths) < 2:
    raise ValueError(f"need at least 2 images for a covariance, found {len(paths)}")
  feats = stats_lib.FeatureStats(clip.model.config.projection_dim)
  bar = None
  if progress and jax.process_index() == 0:
    from tqdm import tqdm

    bar = tqdm(total=len(paths), desc="reference", unit="img")
  for start in range(0, len(paths), clip.batch_size):
    images = []
    for p in paths[start : start + clip.batch_size]:
      with Image.open(p) as im:
        images.append(np.asarray(im.convert("RGB")))
    feats.update(clip.image_features_of_list(images).values)
    if bar is not None:
      bar.update(len(images))
  if bar is not None:
    bar.close()
  return feats.all_reduce()


class PeriodicEvaluator:
  """The trainer's ``config.eval``: ``evaluate`` with fixed prompts and settings, returning
  {'eval/clip_score', 'eval/fid_clip' (with reference statistics), 'eval/num_images'}; with
  ``step_counts`` (e.g. (5, 10, 25, 50), as the paper compares) one evaluation per count
  instead, as 'eval/steps<N>/clip_score', ..."""

  SETTINGS = ("prompts", "num_images", "batch_size", "num_steps", "step_counts", "cfg_scale", "shift", "seed")

  def __init__(
    self,
    clip: CLIPFeatures,
    *,
    fid_clip: Optional[CLIPFeatures] = None,
    reference: Optional[dict] = None,
    mesh=None,
    **settings,
  ):
    unknown = set(settings) - set(self.SETTINGS)
    if unknown:
      raise ValueError(f"unknown evaluation settings {sorted(unknown)}")
    self.clip, self.fid_clip, self.reference, self.mesh = clip, fid_clip or clip, reference, mesh
    self.settings = dict(settings)
    self.settings["prompts"] = list(self.settings.get("prompts") or ())
    expand_prompts(self.settings["prompts"], self.settings.get("num_images"))  # fails early
    counts = list(self.settings.pop("step_counts", None) or ())
    if any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in counts):
      raise ValueError(f"config.eval.step_counts must be step counts >= 1, got {counts!r}")
    self.step_counts = counts
    if reference is not None:
      check_reference(reference, self.fid_clip)

  @classmethod
  def from_settings(cls, e: dict, mesh) -> "PeriodicEvaluator":
    """From config.eval's values (see sd3_jax/config.py)."""
    if not e.get("clip"):
      raise ValueError(
        "config.eval.every > 0 needs config.eval.clip: a CLIP model converted with "
        "`sd3-convert --src CLIPModel_DIR --dst DIR --to jax`"
      )
    kw = dict(mesh=mesh, batch_size=e.get("clip_batch_size", 64))
    clip = CLIPFeatures.from_pretrained(e["clip"], **kw)
    fid_clip = CLIPFeatures.from_pretrained(e["fid_clip"], **kw) if e.get("fid_clip") else None
    reference = stats_lib.load_stats(e["reference_stats"]) if e.get("reference_stats") else None
    settings = {k: e[k] for k in cls.SETTINGS if k in e}
    settings["num_images"] = settings.get("num_images") or None
    return cls(clip, fid_clip=fid_clip, reference=reference, mesh=mesh, **settings)

  def __call__(self, model, params, conditioner, *, latent_shape, decoder=None, formulation=None) -> dict[str, Any]:
    kw = dict(self.settings)
    prompts, default = kw.pop("prompts"), kw.pop("num_steps", 28)
    counts = self.step_counts or [default]
    out = {}
    for n in counts:
      result = evaluate(
        model,
        params,
        conditioner,
        prompts,
        clip=self.clip,
        fid_clip=self.fid_clip,
        reference=self.reference,
        latent_shape=latent_shape,
        decoder=decoder,
        mesh=self.mesh,
        num_steps=n,
        formulation=formulation,
        **kw,
      )
      prefix = f"eval/steps{n}/" if self.step_counts else "eval/"
      out.update({f"{prefix}{k}": v for k, v in result.metrics.items()})
    return out
