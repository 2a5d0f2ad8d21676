"""Scaling sweeps end to end: plan, --print_commands, run, a kill mid-sweep and the rerun that
resumes it, then analyze (sd3_jax.scaling.sweep / branches / runner / analysis / cli).

The mini sweep is the tiny CPU config (synthetic latents, warmup-stable-decay) at width 16 d for
d = 1, 2 and two lengths: 4 runs of seconds each. Run end to end, its lengths are cooldown
branches: per depth a stable run of 200 steps, and the 5-step run a branch from its step 4,
which must equal the same run trained from scratch.
"""

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from sd3_jax import config as config_lib
from sd3_jax.models import flops, mmdit
from sd3_jax.scaling import analysis, cli, runner
from sd3_jax.scaling import sweep as sweep_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")

SWEEP = """
from sd3_jax.scaling.sweep import dotted, sweep_config


def get_config(long_steps="200"):
  s = sweep_config()
  s.name = "mini"
  s.base_config = {tiny!r}
  s.base_overrides = dotted({{"global_batch_size": 4, "log_every": 2, "keep_checkpoints": 2,
                             "optimizer.warmup_steps": 2, "optimizer.schedule": "wsd", "data.num_synthetic": 64,
                             "val.num_examples": 8, "val.batch_size": 8}})
  s.width_per_depth = 16
  s.val_points = 4
  s.grids = [dict(name="mini", depths=(1, 2), lengths=(5, int(long_steps)))]
  return s
"""


@pytest.fixture
def sweep_file(tmp_path):
  path = tmp_path / "mini_sweep.py"
  path.write_text(SWEEP.format(tiny=TINY))
  return str(path)


def test_plan_names_steps_and_compute(sweep_file):
  sweep = sweep_lib.load_sweep(sweep_file)
  runs = sweep_lib.plan(sweep)
  assert [r.name for r in runs] == ["d1_s5", "d1_s200", "d2_s5", "d2_s200"]
  r = runs[3]
  assert r.overrides["model.hidden_size"] == 32 and r.overrides["model.num_heads"] == 2
  assert r.overrides["val.every"] == 50 and r.overrides["checkpoint_every"] == 50
  cfg = sweep_lib.run_config(sweep, r)
  mcfg = mmdit.config_from_preset(**cfg.model)
  assert r.compute.flops == 200 * flops.train_step_flops(mcfg, 8, 8, 8, 4)
  assert r.params["total"] == mmdit.count_params(mcfg)
  # An isoFLOP grid derives each depth's steps from its FLOPs per step; an axis equal to the
  # base config's value changes nothing and is left out of the name (grids share that run).
  sweep.grids = [
    dict(name="iso", depths=(1, 2), budgets=(1e9,), axes={"flow.formulation": ("rf/lognorm(0.00,1.00)", "rf")})
  ]
  runs = sweep_lib.plan(sweep)
  assert [r.name for r in runs] == ["d1_C1e9", "d1_C1e9_formulation-rf", "d2_C1e9", "d2_C1e9_formulation-rf"]
  assert runs[2].steps == round(1e9 / runs[2].compute.flops_per_step) and runs[2].budget == 1e9
  assert runs[0].steps > runs[2].steps  # the smaller model trains longer on the same budget
  assert "flow.formulation" not in runs[0].overrides and runs[1].overrides["flow.formulation"] == "rf"


def test_branched_plan_shares_the_stable_part_and_counts_it_once(sweep_file):
  sweep = sweep_lib.load_sweep(sweep_file, {"cooldown_branches": True})
  runs = sweep_lib.plan(sweep)
  assert [r.name for r in runs] == ["d1_s200", "d1_s5", "d2_s200", "d2_s5"]  # a stable run before its branches
  stable, short = runs[0], runs[1]
  assert (short.branch_of, short.branch_step) == ("d1_s200", 4)  # 5 - round(0.2 x 5)
  assert stable.overrides["keep_checkpoint_steps"] == (4,) and stable.branch_of is None
  cfg = sweep_lib.run_config(sweep, short, "/sweeps/mini")
  assert cfg.branch_from == "/sweeps/mini/d1_s200/checkpoints/4" and cfg.total_steps == 5
  assert short.own_flops == short.compute.flops_per_step * 1 and short.compute.flops == short.compute.flops_per_step * 5
  total = sweep_lib.total_compute(runs)
  per_step = {r.depth: r.compute.flops_per_step for r in runs}
  assert total["flops"] == sum(p * (200 + 1) for p in per_step.values())
  assert total["flops_from_scratch"] == sum(p * (200 + 5) for p in per_step.values())
  assert total["saved_fraction"] == pytest.approx(4 / 205)
  # A width grid sweeps width_per_depth at a fixed depth (d heads), a muP transfer's axis.
  sweep.grids = [dict(name="w", depths=(2,), widths=(16, 32), lengths=(10,))]
  runs = sweep_lib.plan(sweep)
  assert [(r.name, r.overrides["model.hidden_size"], r.overrides["model.num_heads"]) for r in runs] == [
    ("d2_s10", 32, 2),
    ("d2_s10_w32", 64, 2),
  ]


@pytest.mark.parametrize(
  "overrides, message",
  [
    ({"optimizer.schedule": "cosine"}, "cooldown_branches needs optimizer.schedule='wsd'"),
    ({"optimizer.warmup_steps": 5}, "run d1_s5: its cooldown would start at step 4, inside the warm-up"),
    ({"optimizer.decay_fraction": 0.05}, "rounds to no cooldown step"),
  ],
)
def test_bad_branched_sweeps_name_the_fix(sweep_file, overrides, message):
  sweep = sweep_lib.load_sweep(sweep_file, {"cooldown_branches": True})
  sweep.base_overrides.update(overrides)
  with pytest.raises(ValueError, match=message):
    sweep_lib.plan(sweep)


def test_backbone_on_a_sweep_axis(sweep_file):
  """model.backbone as an axis: one run per backbone and depth, each counted with its own
  architecture (parameters in closed form, exact FLOPs), the family's width rule for all."""
  from sd3_jax.models import backbones

  sweep = sweep_lib.load_sweep(sweep_file)
  sweep.grids = [dict(name="arch", depths=(1, 2), lengths=(4,), axes={"model.backbone": backbones.BACKBONES})]
  runs = {r.name: r for r in sweep_lib.plan(sweep)}
  assert set(runs) == {
    f"d{d}_s4" + ("" if b == "mmdit" else f"_backbone-{b}") for d in (1, 2) for b in backbones.BACKBONES
  }
  counts = set()
  for r in runs.values():
    mcfg = mmdit.config_from_preset(**sweep_lib.run_config(sweep, r).model)
    assert mcfg.hidden_size == 16 * r.depth and mcfg.num_heads == r.depth
    assert r.params["total"] == backbones.count_params(mcfg)
    assert r.compute.flops == 4 * flops.train_step_flops(mcfg, 8, 8, 8, 4)
    counts.add((r.depth, r.params["total"]))
  assert len(counts) == 2 * len(backbones.BACKBONES)  # every backbone differs


@pytest.mark.parametrize(
  "grid, message",
  [
    (dict(name="g", depths=(1,), lengths=(4,), budgets=(1e9,)), "exactly one of lengths"),
    (dict(name="g", depths=(1,), lengths=(4,), axes={"model.depth": (1, 2)}), "set by the sweep itself"),
    (dict(name="g", depths=(1,), lengths=(4,), axes={"flow.nonsense": (1,)}), "flow.nonsense"),
    (dict(name="g", lengths=(4,)), "lists no depths"),
  ],
)
def test_bad_sweeps_name_the_problem(sweep_file, grid, message):
  sweep = sweep_lib.load_sweep(sweep_file)
  sweep.grids = [grid]
  with pytest.raises(ValueError, match=message):
    sweep_lib.plan(sweep)


def test_print_commands_reproduce_each_run_config(sweep_file, tmp_path, capsys):
  cli.main(["run", sweep_file, "--sweep_dir", str(tmp_path / "s"), "--print_commands"])
  lines = capsys.readouterr().out.strip().splitlines()
  sweep = sweep_lib.load_sweep(sweep_file)
  runs = sweep_lib.plan(sweep)
  assert len(lines) == len(runs)
  for line, run in zip(lines, runs):
    words = line.split()
    assert words[:5] == ["python", "-m", "sd3_jax.main", "--config", TINY]
    assert words[5:7] == ["--workdir", str(tmp_path / "s" / run.name)]
    overrides = dict(sweep_lib.parse_assignment(w[len("--config.") :]) for w in words[7:])
    assert (
      config_lib.load_config_file(TINY, overrides=overrides).to_dict() == sweep_lib.run_config(sweep, run).to_dict()
    )
  assert not (tmp_path / "s").exists()  # printing trains nothing


def test_missing_sweep_file_is_one_line_and_exit_2(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    from sd3_jax import command

    command.run(cli.main, "sd3-scaling", ["run", str(tmp_path / "nope.py"), "--sweep_dir", str(tmp_path)])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("sd3-scaling: error: no sweep file") and "\n" not in err


def _scaling(args, **kw):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # one CPU device (conftest's 8 fake devices only slow these runs)
  return subprocess.Popen(
    [sys.executable, "-m", "sd3_jax.scaling", *args],
    env=env,
    cwd=REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    **kw,
  )


def _main(args):
  """``python -m sd3_jax.main ARGS`` as the sweep's runs train (one CPU device)."""
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=600)


def _params(workdir):
  from sd3_jax.storage import checkpoint

  _, params, _, step = checkpoint.load_workdir(workdir, use_ema=False)
  return step, jax.tree.map(np.asarray, params)


def test_branched_sweep_resumes_after_a_kill_branches_equal_scratch_and_compute_is_counted(sweep_file, tmp_path):
  sweep_dir = str(tmp_path / "sweep")
  branched = ["--set", "cooldown_branches=True"]
  # 1. Start the sweep and kill it in the middle of its first run, the stable d1_s200 (between
  #    its checkpoint at step 100 and the end), after it wrote the branch point at step 4.
  proc = _scaling(["run", sweep_file, "--sweep_dir", sweep_dir, *branched], start_new_session=True)
  ckpt = os.path.join(sweep_dir, "d1_s200", "checkpoints")
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    if 100 in runner.checkpoint.committed_steps(ckpt):
      break
    time.sleep(0.02)
  assert proc.poll() is None, "the sweep ended before it could be killed:\n" + proc.stdout.read()
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  assert not runner.is_finished(os.path.join(sweep_dir, "d1_s200"), 200), "killed too late to test a resume"
  assert runner.checkpoint.committed_steps(ckpt) == [4, 50, 100]  # the branch point outlives keep_checkpoints=2
  assert not os.path.exists(os.path.join(sweep_dir, "d1_s5"))

  # 2. Rerun: the stable run resumes, keeps its branch point through more saves, and the
  #    branches start from it; once a branch has run, its branch point is deleted.
  proc = _scaling(["run", sweep_file, "--sweep_dir", sweep_dir, *branched])
  out, _ = proc.communicate(timeout=900)
  assert proc.returncode == 0, out
  assert "resuming from step 100 (" in out and "trained 4 run(s)" in out
  assert out.count("branched from") == 2 and f"{ckpt} at step 4" in out
  for name, steps in (("d1_s5", 5), ("d1_s200", 200), ("d2_s5", 5), ("d2_s200", 200)):
    assert runner.is_finished(os.path.join(sweep_dir, name), steps), name
  assert runner.checkpoint.committed_steps(ckpt) == [150, 200]  # step 4 released after its branch ran
  rows = [json.loads(l) for l in open(os.path.join(sweep_dir, "d1_s200", "metrics.jsonl"))]
  assert [r["step"] for r in rows if "val/loss" in r] == [50, 100, 150, 200]  # as an uninterrupted run's
  plan = json.load(open(os.path.join(sweep_dir, runner.SWEEP_FILE)))
  assert [(r["name"], r["branch_of"], r["branch_step"]) for r in plan["runs"]] == [
    ("d1_s200", None, 0),
    ("d1_s5", "d1_s200", 4),
    ("d2_s200", None, 0),
    ("d2_s5", "d2_s200", 4),
  ]

  # 3. The branch equals the same 5-step WSD run from scratch: its command without branch_from.
  sweep = sweep_lib.load_sweep(sweep_file, {"cooldown_branches": True})
  short = next(r for r in sweep_lib.plan(sweep) if r.name == "d1_s5")
  scratch = str(tmp_path / "scratch")
  words = shlex.split(sweep_lib.command_line(sweep, short, sweep_dir, python=sys.executable))
  words = [w for w in words if not w.startswith("--config.branch_from=")]
  words[words.index("--workdir") + 1] = scratch
  done = _main(words[1:])
  assert done.returncode == 0, done.stdout + done.stderr

  def last(workdir):
    rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
    keys = ("loss", "grad_norm", "learning_rate", "val/loss")
    return {k: r[k] for r in rows if r["step"] == 5 for k in keys if k in r}

  assert last(os.path.join(sweep_dir, "d1_s5")) == last(scratch) and len(last(scratch)) == 4
  (step_b, branch_params), (step_s, scratch_params) = _params(os.path.join(sweep_dir, "d1_s5")), _params(scratch)
  assert step_b == step_s == 5
  assert jax.tree.all(jax.tree.map(np.array_equal, branch_params, scratch_params)), "a branch is its run from scratch"

  # 4. Analyze: one CSV row per validation point, compute from the config, fits recorded, and
  #    the compute the branches saved.
  out_dir = str(tmp_path / "analysis")
  result = analysis.analyze([sweep_dir], out_dir, num_bootstrap=20, holdout="d2_s200")
  import csv

  table = list(csv.DictReader(open(os.path.join(out_dir, "runs.csv"))))
  assert [(t["run"], int(t["step"])) for t in table] == [
    *[("d1_s200", s) for s in (50, 100, 150, 200)],
    ("d1_s5", 5),
    *[("d2_s200", s) for s in (50, 100, 150, 200)],
    ("d2_s5", 5),
  ]
  d2 = next(r for r in sweep_lib.plan(sweep) if r.name == "d2_s200")
  row = table[8]
  assert int(row["params_total"]) == d2.params["total"] and int(row["images_seen"]) == 800
  assert float(row["compute"]) == pytest.approx(d2.compute.flops)
  assert float(row["fit_loss"]) == pytest.approx(float(row["val_loss"]))
  assert "val/loss_t0.000" in row and "val/loss_t1.000" in row
  totals = sweep_lib.total_compute(sweep_lib.plan(sweep))
  assert result["compute"]["spent"] == pytest.approx(totals["flops"])
  assert result["compute"]["from_scratch"] == pytest.approx(totals["flops_from_scratch"])
  assert (
    result["compute"]["saved_fraction"] == pytest.approx(totals["saved_fraction"])
    and result["compute"]["branches"] == 2
  )
  runs = {r["name"]: r for r in result["runs"]}
  assert runs["d1_s5"]["own_compute"] == pytest.approx(runs["d1_s5"]["compute"] / 5)  # one step of five
  assert runs["d1_s5"]["branch_of"] == "d1_s200" and runs["d1_s5"]["branch_step"] == 4
  saved = json.load(open(os.path.join(out_dir, "scaling.json")))
  assert saved["holdout_runs"] == ["d2_s200"] and "d2_s200" not in saved["fit_runs"]
  assert saved["parametric"]["fit"] is not None and set(saved["parametric"]["fit"]["ci"]) == {
    "e",
    "a",
    "b",
    "alpha",
    "beta",
  }
  held = result["holdout"][0]
  for p in held["points"]:
    assert p["rel_error"] == pytest.approx((p["predicted"] - p["measured"]) / p["measured"])
  assert held["parametric_mean_abs_rel_error"] == pytest.approx(np.mean([abs(p["rel_error"]) for p in held["points"]]))
  for png in ("loss_vs_compute.png", "loss_vs_steps.png", "holdout.png"):
    assert os.path.getsize(os.path.join(out_dir, png)) > 1000, png
  # The interior levels as the loss to fit: the mean of the logged 0 < t < 1 levels.
  interior = analysis.analyze([sweep_dir], str(tmp_path / "interior"), levels="interior", num_bootstrap=0, plots=False)
  first = [json.loads(l) for l in open(os.path.join(sweep_dir, "d1_s200", "metrics.jsonl")) if "val/loss" in l][0]
  levels = [v for k, v in first.items() if k.startswith("val/loss_t") and 0 < float(k[len("val/loss_t") :]) < 1]
  assert interior["runs"][0]["name"] == "d1_s200"
  table = list(csv.DictReader(open(os.path.join(tmp_path, "interior", "runs.csv"))))
  assert float(table[0]["fit_loss"]) == pytest.approx(np.mean(levels))
  with pytest.raises(ValueError, match="no validation level t=0.5"):
    analysis.analyze([sweep_dir], str(tmp_path / "bad"), levels="0.5", plots=False)


def test_fits_select_the_common_value_and_ignore_keys_older_runs_lack():
  def run(name, **config):
    return {"name": name, "config": config}

  runs = [
    run("a", **{"flow.formulation": "rf/lognorm(0.00,1.00)", "lr": 1}),
    run("b", **{"flow.formulation": "rf/lognorm(0.00,1.00)", "lr": 1, "new_key": "x"}),  # newer code
    run("c", **{"flow.formulation": "rf", "lr": 1, "new_key": "x"}),
    run("d", **{"flow.formulation": "rf/lognorm(0.00,1.00)", "lr": 2, "new_key": "x"}),
    run("e", **{"flow.formulation": "rf/cosmap", "lr": 2, "new_key": "x"}),
  ]
  assert analysis.varying_keys(runs) == ["flow.formulation", "lr"]
  # rf/lognorm(0.00,1.00) is the most common formulation; among those, lr 1 (a, b) beats lr 2 (d).
  assert [r["name"] for r in analysis.select(runs, {})] == ["a", "b"]
  # A tie goes to the value sorted first, whatever order the runs are read in.
  tie = [run("p", lr=2), run("q", lr=1)]
  assert [r["name"] for r in analysis.select(tie, {})] == ["q"]
  assert [r["name"] for r in analysis.select(tie[::-1], {})] == ["q"]
