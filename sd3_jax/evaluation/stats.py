"""Feature statistics and the Frechet distance (FID, Heusel et al. 2017), on the host in float64.

  FeatureStats     running count, mean and scatter matrix of feature vectors, updated batch by
                   batch and merged exactly (Chan et al.'s pairwise update, stable where
                   sum-of-squares is not); ``all_reduce`` merges every process's statistics
                   in process order, so every host gets the same float64 result.
  frechet_distance ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2), with the trace of the
                   square root from the eigenvalues of the symmetric S1^1/2 S2 S1^1/2 (real and
                   stable; clean-fid and pytorch-fid use scipy.linalg.sqrtm of S1 S2 and drop
                   its imaginary part, which agrees to rounding on well-conditioned inputs).
  save_stats / load_stats   reference statistics as .npz with clean-fid's keys ``mu`` and
                   ``sigma`` (plus ``count`` and a ``feature_extractor`` description).
  all_reduce_sum   float64 sums across processes (CLIP score).

The covariance is the unbiased one (``np.cov(features, rowvar=False)``), as clean-fid's.
Collectives carry float64 as raw bits (uint32 pairs), so nothing is rounded to float32 on the
way.
"""

from __future__ import annotations

import json
import os
from typing import Mapping

import jax
import numpy as np


def _allgather_float64(x: np.ndarray) -> np.ndarray:
  """[P, *x.shape] float64: every process's ``x``, bit-exact (jax has no float64 without x64)."""
  from jax.experimental import multihost_utils

  x = np.ascontiguousarray(np.asarray(x, np.float64))
  bits = x.reshape(-1).view(np.uint32)
  gathered = np.asarray(multihost_utils.process_allgather(bits))  # [P, 2 * size]
  return gathered.view(np.float64).reshape((gathered.shape[0],) + x.shape)


def all_reduce_sum(x) -> np.ndarray:
  """Sum of a float64 array over processes, added in process order (the same on every host)."""
  x = np.asarray(x, np.float64)
  if jax.process_count() == 1:
    return x
  parts = _allgather_float64(x)
  total = np.zeros_like(x)
  for p in parts:
    total = total + p
  return total


class FeatureStats:
  """Count, mean [D] and scatter matrix [D, D] (sum of outer products of centred features)."""

  def __init__(self, dim: int):
    self.dim = int(dim)
    self.count = 0
    self.mean = np.zeros(self.dim, np.float64)
    self.scatter = np.zeros((self.dim, self.dim), np.float64)

  def _merge_moments(self, n: int, mean: np.ndarray, scatter: np.ndarray) -> None:
    if n == 0:
      return
    if self.count == 0:
      self.count, self.mean, self.scatter = n, mean.copy(), scatter.copy()
      return
    total = self.count + n
    delta = mean - self.mean
    self.scatter = self.scatter + scatter + np.outer(delta, delta) * (self.count * n / total)
    self.mean = self.mean + delta * (n / total)
    self.count = total

  def update(self, features) -> "FeatureStats":
    """Adds a batch of features [B, D] (any float dtype; accumulated in float64)."""
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or x.shape[1] != self.dim:
      raise ValueError(f"features must be [B, {self.dim}], got {x.shape}")
    if len(x):
      mean = x.mean(0)
      c = x - mean
      self._merge_moments(len(x), mean, c.T @ c)
    return self

  def merge(self, other: "FeatureStats") -> "FeatureStats":
    if other.dim != self.dim:
      raise ValueError(f"cannot merge statistics of {other.dim}-d features into {self.dim}-d ones")
    self._merge_moments(other.count, other.mean, other.scatter)
    return self

  def all_reduce(self) -> "FeatureStats":
    """The statistics of every process's features together (a new object; same on all hosts)."""
    out = FeatureStats(self.dim)
    if jax.process_count() == 1:
      return out.merge(self)
    counts = _allgather_float64(np.array([self.count], np.float64))[:, 0]
    means, scatters = _allgather_float64(self.mean), _allgather_float64(self.scatter)
    for n, m, s in zip(counts, means, scatters):
      out._merge_moments(int(n), m, s)
    return out

  @property
  def cov(self) -> np.ndarray:
    if self.count < 2:
      raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.count}")
    return self.scatter / (self.count - 1)


def matrix_sqrt_trace(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
  """tr((S1 S2)^1/2) for symmetric PSD S1, S2: the square roots of the (non-negative)
  eigenvalues of S1^1/2 S2 S1^1/2, which has the same spectrum as S1 S2."""
  w, v = np.linalg.eigh(sigma1)
  root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
  m = root1 @ sigma2 @ root1
  ev = np.linalg.eigvalsh((m + m.T) / 2)
  return float(np.sum(np.sqrt(np.clip(ev, 0.0, None))))


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """The Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64."""
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(
      f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
      f"{sigma2.shape}; were both computed with the same feature extractor?"
    )
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * matrix_sqrt_trace(sigma1, sigma2))


def save_stats(path: str, stats: FeatureStats, feature_extractor: Mapping | None = None) -> None:
  """Writes ``mu``, ``sigma`` (clean-fid's keys), ``count`` and a JSON description of the
  feature extractor to ``path`` (.npz), atomically."""
  path = os.fspath(path)
  if not path.endswith(".npz"):
    raise ValueError(f"reference statistics are written as .npz, got {path!r}")
  tmp = f"{path[:-4]}.tmp-{os.getpid()}.npz"
  np.savez(
    tmp,
    mu=stats.mean,
    sigma=stats.cov,
    count=np.int64(stats.count),
    feature_extractor=np.array(json.dumps(dict(feature_extractor or {}), sort_keys=True)),
  )
  os.replace(tmp, path)


def load_stats(path: str) -> dict:
  """{'mu', 'sigma', 'count' (None if absent), 'feature_extractor' (dict, {} if absent)}; reads
  clean-fid's statistics files too."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"no reference statistics file {path}; compute one with "
      "`python -m sd3_jax.evaluation.reference_stats --images DIR --clip CLIP --out ref.npz`"
    )
  with np.load(path) as f:
    if "mu" not in f or "sigma" not in f:
      raise ValueError(f"{path} has no 'mu' and 'sigma' arrays (found {sorted(f.files)})")
    out = {
      "mu": np.asarray(f["mu"], np.float64),
      "sigma": np.asarray(f["sigma"], np.float64),
      "count": int(f["count"]) if "count" in f else None,
      "feature_extractor": json.loads(str(f["feature_extractor"])) if "feature_extractor" in f else {},
    }
  return out
