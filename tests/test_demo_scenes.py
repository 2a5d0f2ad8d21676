"""The embedded demo's data generator and its programmatic checker."""

import numpy as np

from sd3_jax.demo import scenes as S


def test_split_is_disjoint_and_covers_vocabulary():
  train, held = S.split_scenes(num_heldout=24)
  assert len(train) + len(held) == len(S.all_scenes()) == 432
  assert not {s.key for s in train} & {s.key for s in held}
  words = lambda scenes: {w for s in scenes for w in s.caption.split()}
  assert words(held) <= words(train)


def test_checker_reads_rendered_scenes_and_rejects_wrong_captions():
  scenes = S.all_scenes()
  imgs, truth = zip(*S.examples(scenes, 400, seed=7))
  right = S.accuracy(list(imgs), list(truth))
  assert right["all"] > 0.97 and right["relation"] == 1.0
  # The same images against shuffled captions: the chance level is low.
  perm = np.random.default_rng(0).permutation(len(truth))
  wrong = S.accuracy(list(imgs), [truth[i] for i in perm])
  assert wrong["all"] < 0.05


def test_checker_parts():
  sc = S.Scene("red", "circle", "above", "blue", "square")
  img = S.render(sc, 32, np.random.default_rng(1))
  assert S.check(img, sc)["all"]
  flipped = S.Scene("red", "circle", "below", "blue", "square")
  r = S.check(img, flipped)
  assert r["colors"] and r["shape1"] and r["shape2"] and not r["relation"] and not r["all"]
  assert not S.check(np.zeros((32, 32, 3), np.uint8), sc)["colors"]  # blank image
  noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
  assert not S.check(noise, sc)["all"]
