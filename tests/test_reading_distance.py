"""The toy study's second quality measure (``scenes.reading_distance``: how far the checker's
readings of a set of images are from its readings of real renders of the same prompts) and the
paper's rank over two quality measures that uses it (``ranking.paper_average_rank``)."""

import dataclasses

import pytest

from sd3_jax.demo import scenes as S
from sd3_jax.scaling import analysis, ranking

SIZE = 32
_, HELD = S.split_scenes(num_heldout=24)
SCENES = [s for s in HELD for _ in range(2)]  # 24 prompts x 2, as score_run repeats each prompt
OPPOSITE = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}


def _other_color(scene):
  return next(c for c in S.COLORS if c not in (scene.color1, scene.color2))


@pytest.fixture(scope="module")
def real():
  return S.renders(SCENES, SIZE, seed=0)


def test_real_renders_are_at_distance_zero(real):
  assert S.reading_distance(real, real, SCENES) == {p: 0.0 for p in (*S.PARTS, "mean")}
  # other renders of the same prompts: the checker reads every one right, so nothing changes
  assert S.reading_distance(S.renders(SCENES, SIZE, seed=5), real, SCENES)["mean"] == 0.0
  assert S.accuracy(real, SCENES)["all"] == 1.0


def test_wrong_colours_are_far(real):
  # the first shape drawn in a colour the caption does not name: its colour, shape and the
  # relation are read 'absent', and an extra colour is present, for every image
  wrong = S.renders([dataclasses.replace(s, color1=_other_color(s)) for s in SCENES], SIZE, seed=0)
  d = S.reading_distance(wrong, real, SCENES)
  assert d["colors"] == d["shape1"] == d["relation"] == 1.0 and d["shape2"] == 0.0 and d["mean"] == 0.75
  assert S.reading_distance(real, wrong, SCENES) == d  # symmetric
  # half of them wrong: half as far
  half = [w if i % 2 else r for i, (w, r) in enumerate(zip(wrong, real))]
  assert S.reading_distance(half, real, SCENES)["mean"] == pytest.approx(0.375)


def test_swapped_positions_are_seen_as_far_as_they_change_the_distribution(real):
  swapped = [dataclasses.replace(s, relation=OPPOSITE[s.relation]) for s in SCENES]
  # a set whose prompts all say 'above', drawn 'below': the relation's distribution moves entirely
  idx = [i for i, s in enumerate(SCENES) if s.relation == "above"]
  above = [SCENES[i] for i in idx]
  d = S.reading_distance(S.renders([swapped[i] for i in idx], SIZE), [real[i] for i in idx], above)
  assert d["relation"] == 1.0 and d["colors"] == d["shape1"] == d["shape2"] == 0.0 and d["mean"] == 0.25
  # every prompt's relation reversed: the distance sees only how the relations' shares change
  # (like FID it compares sets, not image-caption pairs); the sample accuracy sees every one
  images = S.renders(swapped, SIZE)
  count = {r: sum(s.relation == r for s in SCENES) - sum(s.relation == r for s in swapped) for r in S.RELATIONS}
  shift = 0.5 * sum(abs(c) for c in count.values()) / len(SCENES)
  assert 0 < shift < 0.2 and S.reading_distance(images, real, SCENES)["relation"] == pytest.approx(shift)
  assert S.accuracy(images, SCENES)["relation"] == 0.0


def test_readings_and_bounds(real):
  blank = [im * 0 for im in real]
  assert S.readings(blank[0], SCENES[0]) == {
    "colors": "neither", "shape1": "absent", "shape2": "absent", "relation": "absent"
  }  # fmt: skip
  s = SCENES[0]
  assert S.readings(real[0], s) == {"colors": "both", "shape1": s.shape1, "shape2": s.shape2, "relation": s.relation}
  # nothing drawn: every part's reading differs from every real one, the distance's bound
  assert S.reading_distance(blank, real, SCENES)["mean"] == 1.0
  with pytest.raises(ValueError, match="one reference and one scene per image"):
    S.reading_distance(real[:3], real, SCENES)


def test_analysis_carries_reading_distance_and_knows_lower_is_better():
  sample = {"by_steps": {"5": {"sample_accuracy": 0.5, "part_accuracy": 0.7, "reading_distance": 0.2}}}
  metrics = analysis.sample_metrics({}, {}, sample)
  assert metrics == {"sample_accuracy@5": 0.5, "part_accuracy@5": 0.7, "reading_distance@5": 0.2}
  assert not ranking.higher_is_better("reading_distance@5") and ranking.higher_is_better("sample_accuracy@5")


def _member(name, metrics):
  return {
    "name": name,
    "config": {"flow.formulation": name},
    "points": [{"loss": 0.5, "val_loss": 0.5}],
    "sample_metrics": metrics,
  }


def test_paper_rank_over_accuracy_and_reading_distance():
  # (sample accuracy, reading distance) at 5 and 25 steps.
  # 5 steps: a and b on the front (a nearer, b more accurate), c behind a, d behind all -> 1 1 2 3
  # 25 steps: a beats all; c beats b; b beats d -> 1 3 2 4
  table = {
    "a": ((0.5, 0.10), (0.7, 0.05)),
    "b": ((0.6, 0.30), (0.5, 0.30)),
    "c": ((0.4, 0.20), (0.6, 0.10)),
    "d": ((0.3, 0.40), (0.2, 0.50)),
  }
  members = [
    _member(name, {f"{k}@{n}": v for n, pair in zip((5, 25), pairs) for k, v in zip(ranking.QUALITY_PAIRS[1], pair)})
    for name, pairs in table.items()
  ]
  assert ranking.quality_pair(members) == ("sample_accuracy", "reading_distance")
  assert ranking.paper_average_rank(members) == [1.0, 2.0, 2.0, 3.5]
  rows = {r["run"]: r for r in ranking.rank_group(members, "flow.formulation", "loss")}
  assert {k: r["paper_rank"] for k, r in rows.items()} == {"a": 1.0, "b": 2.0, "c": 2.0, "d": 3.5}
  assert rows["a"]["paper_rank_by"] == "sample_accuracy/reading_distance"
  # a step count some run lacks a measure at is left out: 5 steps only
  del members[3]["sample_metrics"]["reading_distance@25"]
  assert ranking.paper_average_rank(members) == [1.0, 1.0, 2.0, 3.0]
  # where CLIP score and FID were logged they are the paper's pair, as before
  for m, (clip, fid) in zip(members, [(0.2, 50.0), (0.3, 40.0), (0.1, 60.0), (0.25, 45.0)]):
    m["sample_metrics"] |= {"clip_score@10": clip, "fid_clip@10": fid}
  assert ranking.quality_pair(members) == ("clip_score", "fid_clip")
  assert ranking.paper_average_rank(members) == [3.0, 1.0, 4.0, 2.0]
  assert ranking.paper_average_rank([_member("e", {"sample_accuracy@5": 0.1})]) == [None]
