"""The shipped study configs plan what their docstrings say (the toy study's cooldown branches,
the muP learning-rate transfer sweep), the transfer analysis and its plot on runs with a known
answer, and a sweep that goes on past a diverged run (no training here: seconds)."""

import json
import os

import pytest

from sd3_jax.scaling import compare, plots, runner
from sd3_jax.scaling import sweep as sweep_lib
from sd3_jax.training import divergence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs", "scaling")


def test_toy_study_branches_three_lengths_per_model(tmp_path):
  runs = sweep_lib.plan(sweep_lib.load_sweep(os.path.join(CONFIGS, "toy.py") + f":{tmp_path}"))
  assert len(runs) == 21
  stables = [r for r in runs if not r.branch_of]
  assert len(stables) == 7 and {r.steps for r in stables} == {1200}
  for s in stables:
    mine = sorted((r.steps, r.branch_step) for r in runs if r.branch_of == s.name)
    assert mine == [(400, 320), (800, 640)], s.name
    assert s.overrides["keep_checkpoint_steps"] == (320, 640)
  steps = sum(r.steps - r.branch_step for r in runs)
  assert steps == 10_080 and sum(r.steps for r in runs) == 16_800  # as configs/scaling/toy.py says


def test_mup_transfer_sweep_crosses_width_learning_rate_and_parametrization(tmp_path):
  sweep = sweep_lib.load_sweep(os.path.join(CONFIGS, "mup_transfer.py") + f":{tmp_path}")
  runs = sweep_lib.plan(sweep)
  assert len(runs) == 3 * 8 * 2
  hidden = {r.overrides["model.hidden_size"] for r in runs}
  assert hidden == {32, 64, 128} and {r.overrides["model.num_heads"] for r in runs} == {2}
  lrs = sorted({r.overrides["optimizer.learning_rate"] for r in runs})
  assert lrs == [2.0**e for e in range(-12, -4)]
  cfg = sweep_lib.run_config(sweep, next(r for r in runs if r.name.endswith("parametrization-mup")))
  from sd3_jax.models import mmdit

  mcfg = mmdit.config_from_preset(**cfg.model)
  assert mcfg.parametrization == "mup" and mcfg.mup_base_width == 32
  widest = mmdit.config_from_preset(**sweep_lib.run_config(sweep, runs[-1]).model)
  assert widest.hidden_size == 128 and widest.attention_scale == pytest.approx(4 / 64)  # head dim 64, base 16


def _run(width, lr, parametrization, loss, diverged=False):
  return {
    "name": f"w{width}_lr{lr}_{parametrization}",
    "depth": 2,
    "width": width,
    "total_steps": 600,
    "finished": not diverged,
    "diverged": {"error": "nan"} if diverged else None,
    "config": {"optimizer.learning_rate": lr, "model.parametrization": parametrization},
    "points": [{"loss": loss, "step": 600}],
  }


def test_transfer_finds_each_widths_best_value_and_how_far_it_moves(tmp_path):
  """SP: the optimum halves with each doubling of width (moves 2 grid steps over 3 widths);
  muP: it stays put. A diverged run is never the best."""
  grid = [2.0**e for e in range(-10, -5)]
  runs = []
  for i, w in enumerate((32, 64, 128)):
    for j, lr in enumerate(grid):
      runs.append(_run(w, lr, "sp", 1.0 + 0.1 * (j - (3 - i)) ** 2, diverged=(j == 4 and w == 128)))
      runs.append(_run(w, lr, "mup", 1.0 + 0.1 * (j - 2) ** 2 - 0.01 * i))
  keys = ["model.parametrization", "optimizer.learning_rate"]
  groups = {g["fixed"]["model.parametrization"]: g for g in compare.transfer(runs, keys)}
  assert groups["sp"]["best"] == {"32": grid[3], "64": grid[2], "128": grid[1]} and groups["sp"]["shift"] == 2
  assert groups["mup"]["best"] == {"32": grid[2], "64": grid[2], "128": grid[2]} and groups["mup"]["shift"] == 0
  assert [c["final_loss"] for c in groups["sp"]["curves"]["128"]][-1] is None
  assert compare.transfer(runs, ["model.parametrization"]) == []  # nothing swept: nothing to report
  path = str(tmp_path / "transfer.png")
  plots.transfer_plot(list(groups.values()), path)
  assert os.path.getsize(path) > 10_000
  json.dumps(list(groups.values()))  # strict JSON (no NaN/Infinity) for scaling.json


def test_a_diverged_run_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
  sweep_file = tmp_path / "s.py"
  sweep_file.write_text(
    "from sd3_jax.scaling.sweep import sweep_config\n"
    "def get_config():\n"
    "  s = sweep_config()\n"
    f"  s.base_config = {os.path.join(REPO, 'configs', 'tiny.py')!r}\n"
    "  s.width_per_depth = 16\n"
    "  s.grids = [dict(name='g', depths=(1,), lengths=(4,), axes={'optimizer.learning_rate': (0.001, 10.0)})]\n"
    "  return s\n"
  )
  trained = []

  def fake_train(config, workdir):  # the trainer's contract: NaN -> TrainingDivergedError
    if config.optimizer.learning_rate > 1:
      raise divergence.TrainingDivergedError("non-finite training values at step 3: {'loss': nan}")
    trained.append(os.path.basename(workdir))

  from sd3_jax.training import train

  monkeypatch.setattr(train, "train_and_evaluate", fake_train)
  sweep = sweep_lib.load_sweep(str(sweep_file))
  sweep_dir = str(tmp_path / "sweep")
  assert runner.run_sweep(sweep, sweep_dir) == ["d1_s4"]
  bad = os.path.join(sweep_dir, "d1_s4_learning_rate-10.0")
  assert runner.is_diverged(bad) and "nan" in json.load(open(os.path.join(bad, runner.DIVERGED_FILE)))["error"]
  assert runner.run_sweep(sweep, sweep_dir) == ["d1_s4"]  # the rerun skips the diverged run (the fake never saves)
  assert trained == ["d1_s4", "d1_s4"]
