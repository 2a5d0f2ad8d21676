"""The embedded demo's data: two coloured shapes in a relation, with captions, and a checker.

Every image shows two shapes of different colours on a black background, e.g. "a red circle
above a blue square". The generator is deterministic per (seed, index); the checker reads a
generated image back (which colours are present, where their centroids are, how much of their
bounding box each fills) so that a text-to-image model can be scored on held-out caption
combinations without any learned classifier. ``reading_distance`` compares the distribution of
those readings over a set of images with their distribution over real renders of the same prompts.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from typing import Iterator, Sequence

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
  "red": (230, 40, 40),
  "green": (40, 200, 60),
  "blue": (50, 80, 235),
  "yellow": (235, 220, 40),
}
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("above", "below", "left of", "right of")


@dataclasses.dataclass(frozen=True)
class Scene:
  color1: str
  shape1: str
  relation: str
  color2: str
  shape2: str

  @property
  def caption(self) -> str:
    return f"a {self.color1} {self.shape1} {self.relation} a {self.color2} {self.shape2}"

  @property
  def key(self) -> tuple:
    return (self.color1, self.shape1, self.relation, self.color2, self.shape2)


def all_scenes() -> list[Scene]:
  """Every caption combination (two different colours): 4*3*4*3*3 = 432."""
  return [
    Scene(c1, s1, r, c2, s2)
    for c1, c2 in itertools.permutations(COLORS, 2)
    for s1, s2, r in itertools.product(SHAPES, SHAPES, RELATIONS)
  ]


def split_scenes(num_heldout: int = 24, seed: int = 0) -> tuple[list[Scene], list[Scene]]:
  """(train, held-out) caption combinations; the held-out ones never appear in training.

  Held-out scenes are chosen so that every colour, shape and relation still occurs in
  training (the test is compositional generalisation, not unseen words)."""
  scenes = all_scenes()
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(scenes))
  heldout = [scenes[i] for i in order[:num_heldout]]
  train = [scenes[i] for i in order[num_heldout:]]
  return train, heldout


def _mask(shape: str, size: int, cy: float, cx: float, r: float) -> np.ndarray:
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
  if shape == "circle":
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
  if shape == "square":
    return (np.abs(yy - cy) <= r * 0.9) & (np.abs(xx - cx) <= r * 0.9)
  if shape == "triangle":  # apex up, base at the bottom
    top, bottom = cy - r, cy + r
    half_width = (yy - top) / (bottom - top) * r
    return (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= half_width)
  raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES}")


def render(scene: Scene, size: int = 32, rng: np.random.Generator | None = None) -> np.ndarray:
  """uint8 image [size, size, 3]: shape 1 in `relation` to shape 2, with random jitter."""
  rng = rng or np.random.default_rng(0)
  r = size * rng.uniform(0.15, 0.19)
  lo, hi = r + 1, size - r - 1
  # Along the relation's axis the shapes sit in opposite halves, at least 2.1 r apart (they
  # never overlap); across it they are within +-0.35 of that distance (the relation is clear).
  near = rng.uniform(lo, size / 2 - 1.05 * r)
  far = rng.uniform(max(size / 2 + 1.05 * r, near + 2.1 * r), hi)
  sep = far - near
  mid = rng.uniform(lo + 0.35 * sep / 2, hi - 0.35 * sep / 2)
  off = rng.uniform(-0.35, 0.35, size=2) * sep / 2
  first, second = (near, far) if scene.relation in ("above", "left of") else (far, near)
  if scene.relation in ("above", "below"):
    c1, c2 = (first, mid + off[0]), (second, mid + off[1])
  else:
    c1, c2 = (mid + off[0], first), (mid + off[1], second)
  img = np.zeros((size, size, 3), np.uint8)
  img[_mask(scene.shape2, size, *c2, r)] = COLORS[scene.color2]
  img[_mask(scene.shape1, size, *c1, r)] = COLORS[scene.color1]
  return img


def examples(scenes: list[Scene], n: int, size: int = 32, seed: int = 0) -> Iterator[tuple[np.ndarray, Scene]]:
  """n (image, scene) pairs cycling through `scenes` in a seeded random order."""
  rng = np.random.default_rng(seed)
  for i in range(n):
    scene = scenes[int(rng.integers(len(scenes)))]
    yield render(scene, size, np.random.default_rng([seed, i])), scene


# ---------------------------------------------------------------------------------------------
# The checker


@dataclasses.dataclass(frozen=True)
class Reading:
  """What the checker sees for one colour of a scene: None when that colour is absent."""

  centroid: tuple[float, float] | None
  shape: str | None


def _classify(mask: np.ndarray) -> str:
  ys, xs = np.nonzero(mask)
  h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
  fill = mask.sum() / float(h * w)
  # Triangle: the top third of its box is much thinner than the bottom third.
  third = max(h // 3, 1)
  top = mask[ys.min() : ys.min() + third].sum()
  bottom = mask[ys.max() - third + 1 : ys.max() + 1].sum()
  if bottom > 0 and top / bottom < 0.6:
    return "triangle"
  return "square" if fill > 0.88 else "circle"


def read_color(image: np.ndarray, color: str, min_pixels: int = 6) -> Reading:
  """Pixels closest to `color` (among the palette and the black background)."""
  img = image.astype(np.float64)
  palette = {"background": (0, 0, 0), **COLORS}
  names = list(palette)
  dist = np.stack([np.sum((img - np.array(palette[n], np.float64)) ** 2, -1) for n in names], -1)
  nearest = np.argmin(dist, -1)
  mask = (nearest == names.index(color)) & (np.sqrt(dist.min(-1)) < 90)
  if mask.sum() < min_pixels:
    return Reading(None, None)
  ys, xs = np.nonzero(mask)
  return Reading((float(ys.mean()), float(xs.mean())), _classify(mask))


def read_relation(a: Reading, b: Reading) -> str | None:
  """Where shape a sits relative to shape b, by the larger centroid offset (one of RELATIONS);
  None when either is absent or the centroids coincide."""
  if a.centroid is None or b.centroid is None:
    return None
  dy, dx = a.centroid[0] - b.centroid[0], a.centroid[1] - b.centroid[1]
  if abs(dy) > abs(dx):
    return "above" if dy < 0 else "below"
  if dx != 0:
    return "left of" if dx < 0 else "right of"
  return None


def check(image: np.ndarray, scene: Scene) -> dict[str, bool]:
  """Which parts of the caption the image satisfies: colours present, shapes, relation."""
  a, b = read_color(image, scene.color1), read_color(image, scene.color2)
  present = a.centroid is not None and b.centroid is not None
  relation = present and read_relation(a, b) == scene.relation
  out = {"colors": present, "shape1": a.shape == scene.shape1, "shape2": b.shape == scene.shape2, "relation": relation}
  out["all"] = all(out.values())
  return out


def accuracy(images: list[np.ndarray], scenes: list[Scene]) -> dict[str, float]:
  """Fraction of images satisfying each part of their caption, and all of it."""
  results = [check(im, sc) for im, sc in zip(images, scenes)]
  return {k: float(np.mean([r[k] for r in results])) for k in results[0]}


# ---------------------------------------------------------------------------------------------
# How far a set of images is from real renders, by the checker's readings

PARTS = ("colors", "shape1", "shape2", "relation")


def renders(scenes: Sequence[Scene], size: int, seed: int = 0) -> list[np.ndarray]:
  """Real renders of `scenes` in order (repeat a scene for several per prompt); image i's jitter
  comes from (seed, i)."""
  return [render(s, size, np.random.default_rng([seed, i])) for i, s in enumerate(scenes)]


def readings(image: np.ndarray, scene: Scene) -> dict[str, str]:
  """What the checker reads for each part of `scene`'s caption, as a category, right or wrong:
  colors: which of the caption's two colours are present ('both', 'first only', 'second only',
  'neither'), with ' + other' when another palette colour is present too; shape1 / shape2: the
  shape class read for the first / second colour, or 'absent'; relation: the relation read
  between them (one of RELATIONS), or 'absent'."""
  found = {c: read_color(image, c) for c in COLORS}
  a, b = found[scene.color1], found[scene.color2]
  has = (a.centroid is not None, b.centroid is not None)
  colors = {(True, True): "both", (True, False): "first only", (False, True): "second only"}.get(has, "neither")
  if any(r.centroid is not None for c, r in found.items() if c not in (scene.color1, scene.color2)):
    colors += " + other"
  return {
    "colors": colors,
    "shape1": a.shape or "absent",
    "shape2": b.shape or "absent",
    "relation": read_relation(a, b) or "absent",
  }


def reading_distance(
  images: Sequence[np.ndarray], references: Sequence[np.ndarray], scenes: Sequence[Scene]
) -> dict[str, float]:
  """How far the checker's readings of `images` are, as a distribution, from its readings of
  `references` (real renders of the same prompts: ``renders(scenes, size, seed)``); image i and
  reference i are both read against scenes[i]. No learned network is involved.

  For each part p in PARTS, P_p and Q_p are the distributions of the part's reading (``readings``)
  over the images and over the references, and

      D_p = TV(P_p, Q_p) = 1/2 * sum_v |P_p(v) - Q_p(v)|,      reading_distance = mean_p D_p.

  Total variation is bounded in [0, 1], symmetric, 0 only for equal distributions, and reads
  directly: the share of the images whose reading would have to change to match the references.
  Like FID it compares sets, not image-caption pairs: it sees missing or extra colours, shapes
  the references do not have, one shape or relation drawn for every prompt, but not errors that
  keep the distribution (every 'above' drawn as 'below' in a set with as many of each); that is
  the sample accuracy's to see. Per part rather than joint: with 4 parts of 5 to 8 values each,
  a joint histogram would need far more than the few hundred samples scored.

  Returns {part: D_p for each part, 'mean': reading_distance}; lower is better."""
  if not (len(images) == len(references) == len(scenes)) or not scenes:
    raise ValueError(
      f"reading_distance needs one reference and one scene per image, got {len(images)} images, "
      f"{len(references)} references and {len(scenes)} scenes; render the references with renders(scenes, size)"
    )
  ours = [readings(im, sc) for im, sc in zip(images, scenes)]
  real = [readings(im, sc) for im, sc in zip(references, scenes)]
  out = {}
  for part in PARTS:  # both sets hold len(scenes) readings: TV = sum_v |count difference| / (2 n),
    # summed in integers so that the value does not depend on the order of the readings' set
    p, q = collections.Counter(r[part] for r in ours), collections.Counter(r[part] for r in real)
    out[part] = sum(abs(p[v] - q[v]) for v in p.keys() | q.keys()) / (2 * len(scenes))
  out["mean"] = float(np.mean([out[part] for part in PARTS]))
  return out
