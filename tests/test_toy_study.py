"""The toy study's parts and report (configs/scaling/toy_study.py, scaling/study.py): the sweeps
each part plans, and the five claims judged from run directories written by hand with known
losses, sample scores and throughput (the report reads only files)."""

import json
import os

import numpy as np
import pytest
from scipy import stats

from sd3_jax.scaling import claims, cli, runner, study
from sd3_jax.scaling import sweep as sweep_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDY = os.path.join(REPO, "configs", "scaling", "toy_study.py")
CHANCE = 0.0065


def _sweep(part):
  return sweep_lib.load_sweep(f"{STUDY}:/data,{part}")


def test_each_part_plans_the_regime_written_down():
  scaling = sweep_lib.plan(_sweep("scaling"))
  assert sorted((r.depth, r.steps) for r in scaling) == [(d, n) for d in (1, 2, 3, 4) for n in (400, 800, 1200)]
  assert {r.overrides["model.hidden_size"] for r in scaling} == {32, 64, 96, 128}  # hidden 32 d, d heads
  assert sum(r.branch_of is not None for r in scaling) == 8  # 400 and 800 are cooldown branches

  formulations = sweep_lib.plan(_sweep("formulations"))
  sweep = _sweep("formulations")
  cfgs = [sweep_lib.run_config(sweep, r) for r in formulations]
  assert (
    len(formulations) == 21 and {r.depth for r in formulations} == {2} and {r.steps for r in formulations} == {1200}
  )
  pairs = {(c.flow.formulation, c.seed) for c in cfgs}
  assert pairs == {(f, s) for f in claims.PAPER_FORMULATION_RANK for s in (0, 1, 2)}
  assert {c.global_batch_size for c in cfgs} == {64} and {c.optimizer.schedule for c in cfgs} == {"wsd"}

  sweep = _sweep("backbones")
  backbones = sweep_lib.plan(sweep)
  cfgs = {r.name: sweep_lib.run_config(sweep, r, "/sweep") for r in backbones}
  assert len(backbones) == 15
  # equal compute: each backbone's three runs spend the MM-DiT's 400/800/1200-step FLOPs
  for r in backbones:
    assert r.budget in sweep.grids[0]["budgets"]
    assert abs(r.compute.flops - r.budget) <= r.compute.flops_per_step / 2
  assert {c.model.backbone for c in cfgs.values()} == set(
    study_backbones := ("mmdit", "mmdit3", "crossdit", "dit", "uvit")
  )
  assert len(study_backbones) == 5 and {c.model.clip_tokens for c in cfgs.values()} == {12}
  with pytest.raises(ValueError, match="part 'sizes' is not one of"):
    sweep_lib.load_sweep(f"{STUDY}:/data,sizes")


def _write_run(root, sweep, run, losses, quality=None, gflops=50.0):
  """A run directory: its config, validation rows at ``losses`` {step: loss}, throughput rows and
  (``quality`` {steps: (accuracy, distance)}) its sample_eval.json."""
  d = os.path.join(root, run.name)
  cfg = sweep_lib.run_config(sweep, run, root).to_dict()
  last = max(losses)
  ckpt = os.path.join(d, "checkpoints", str(last))
  os.makedirs(os.path.join(ckpt, "config"))
  open(os.path.join(ckpt, "commit_success.txt"), "w").close()
  with open(os.path.join(ckpt, "config", "metadata"), "w") as f:
    json.dump(cfg, f)
  with open(os.path.join(d, "scaling_run.json"), "w") as f:  # as the sweep runner writes it
    json.dump(run.to_dict(), f)
  rows = [{"step": s, "val/loss": v, "val/rf_loss": v} for s, v in sorted(losses.items())]
  rows += [{"step": 50 * i, "step_time": 0.1, "tflops_per_sec": gflops * (1 + 0.01 * i) / 1e3} for i in range(1, 4)]
  with open(os.path.join(d, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  if quality is not None:
    by_steps = {
      str(n): {"sample_accuracy": a, "part_accuracy": a, "reading_distance": dist, "chance": {"all": CHANCE}}
      for n, (a, dist) in quality.items()
    }
    with open(os.path.join(d, "sample_eval.json"), "w") as f:
      json.dump(
        {"step": last, "sample_accuracy": quality[25][0], "part_accuracy": quality[25][0], "by_steps": by_steps}, f
      )


def _law(n, images):
  return 0.2 + 30.0 * n**-0.5 + 40.0 * images**-0.45


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """All three parts, with losses from a known L(N, D), quality that falls with loss, formulations
  ranked in the paper's order, and backbones in the paper's."""
  root = str(tmp_path_factory.mktemp("study"))
  sweep = _sweep("scaling")
  for run in sweep_lib.plan(sweep):
    steps = [run.steps * k // 4 for k in (1, 2, 3, 4)]
    losses = {s: float(_law(run.params["non_embedding"], s * 64)) for s in steps}
    acc = 0.01 * run.depth**2 * run.steps / 1200  # d4 at 1200 steps: 0.16, d1 at 400: 0.0033
    quality = {25: (acc, 0.5 - acc), 5: (acc * (1 - 0.4 / run.depth), 0.6 - acc)}  # the drop shrinks with depth
    _write_run(os.path.join(root, "scaling"), sweep, run, losses, quality, gflops=10.0 * run.depth)

  sweep = _sweep("formulations")
  for run in sweep_lib.plan(sweep):
    cfg = sweep_lib.run_config(sweep, run)
    place = list(claims.PAPER_FORMULATION_RANK).index(cfg.flow.formulation)  # 0 = the paper's best
    acc = 0.1 - 0.01 * place - 0.002 * cfg.seed
    quality = {n: (acc - (0.01 if n == 5 else 0.0), 0.3 + 0.02 * place) for n in (5, 25)}
    _write_run(os.path.join(root, "formulations"), sweep, run, {1200: 0.30 + 0.01 * place + 0.001 * cfg.seed}, quality)

  sweep = _sweep("backbones")
  order = {"mmdit3": 0.290, "mmdit": 0.292, "crossdit": 0.30, "uvit": 0.31, "dit": 0.32}
  for run in sweep_lib.plan(sweep):
    name = sweep_lib.run_config(sweep, run, "/s").model.backbone
    early = {"uvit": -0.05}.get(name, 0.0) * (run.budget == min(sweep.grids[0]["budgets"]))
    loss = order[name] + 1.0 / run.steps + early
    _write_run(
      os.path.join(root, "backbones"), sweep, run, {run.steps: loss}, {25: (0.4 - loss, loss), 5: (0.3 - loss, loss)}
    )
  return root


def test_the_report_judges_each_claim_from_the_numbers(workdir, tmp_path):
  out = str(tmp_path / "report")
  result = study.study(workdir, out, num_bootstrap=20)
  assert result["missing_parts"] == [] and result["parts"] == {"scaling": 12, "formulations": 21, "backbones": 15}

  g = result["regime"]
  assert g["best"]["run"] == "d4_s1200" and g["best"]["times_chance"] == pytest.approx(0.16 / CHANCE)
  assert g["discriminates"] and g["worst"]["accuracy"] == pytest.approx(0.01 / 3) and g["chance"] == CHANCE

  tp = {(t["depth"], t["backbone"]): t for t in result["throughput"] if t["part"] != "formulations"}
  assert tp[(3, "mmdit")]["gflops_per_sec"] == pytest.approx(30.0 * 1.02)  # the median logged row
  assert tp[(2, "uvit")]["runs"] == 3 and tp[(2, "uvit")]["step_time"] == pytest.approx(0.1)

  c1 = result["claim1_frontier"]
  assert [h["final_step"] for h in c1["holdout"]] == [400, 800, 1200]
  for h in c1["holdout"]:  # the data follow a parametric law exactly
    assert abs(h["parametric_rel_error"]) < 0.01
  assert c1["lengths_within_5pct"]["parametric"] == 3 and c1["holdout"][0]["untrusted_parametric_rel_error"] is None
  assert c1["reproduced"] == (
    c1["frontier"]["trusted"] and c1["r2_log"] >= 0.97 and min(c1["lengths_within_5pct"].values()) >= 2
  )

  c2 = result["claim2_formulations"]
  assert [r["formulation"] for r in c2["rows"]] == list(claims.PAPER_FORMULATION_RANK)
  assert [r["rank"]["mean"] for r in c2["rows"]] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
  cell = c2["rows"][0]["sample_accuracy@25"]
  accs = [0.1, 0.098, 0.096]
  half = stats.t.ppf(0.975, 2) * np.std(accs, ddof=1) / np.sqrt(3)
  assert cell["n"] == 3 and cell["mean"] == pytest.approx(0.098) and cell["high"] == pytest.approx(0.098 + half)
  assert c2["rows"][-1]["rf_loss"]["mean"] == pytest.approx(0.361)
  assert c2["spearman_with_paper"]["rho"] == pytest.approx(1.0) and c2["best"] == "rf/lognorm(0.00,1.00)"
  assert c2["reproduced"]

  c3 = result["claim3_backbones"]
  assert len(c3["rows"]) == 15 and len(c3["budgets"]) == 3
  k = c3["checks"]
  assert k["lowest_loss_at_largest_budget"] == "mmdit3" and k["highest_loss_at_largest_budget"] == "dit"
  assert k["lowest_loss_at_smallest_budget"] == "uvit" and k["uvit_fastest_early"]
  assert k["best_distance_at_largest_budget"] == "mmdit3"  # the fixture's distance is the loss
  assert k["mmdit3_vs_mmdit_rel_loss"] < 0 and c3["reproduced"]

  c4 = result["claim4_correlation"]
  assert c4["all"]["num_runs"] == 48 and c4["all"]["rho"] < -0.5 and c4["all"]["p_value"] < 1e-3
  assert c4["formulations"]["rho"] == pytest.approx(-1.0) and c4["reproduced"] == (c4["all"]["rho"] <= -0.8)
  # the fixture's distance rises with loss in every part: rho > 0; accuracy over one chance level = accuracy
  assert c4["beside"]["reading_distance@25"]["rho"] > 0.5
  assert c4["beside"]["accuracy_over_chance@25"]["rho"] == pytest.approx(c4["all"]["rho"], abs=0.01)  # ties may round

  c5 = result["claim5_steps"]
  drops = {r["depth"]: r["relative_drop"] for r in c5["rows"]}
  assert drops == pytest.approx({1: 0.4, 2: 0.2, 3: 0.4 / 3, 4: 0.1})
  assert [r["part_relative_drop"] for r in c5["rows"]] == pytest.approx([0.4, 0.2, 0.4 / 3, 0.1])  # parts = all here
  assert c5["usable_depths"] == [2, 3, 4]  # d1 (0.01) is below 2x chance
  assert c5["depth_vs_drop"]["rho"] == pytest.approx(-1.0) and c5["reproduced"]

  md = open(os.path.join(out, "study.md")).read()
  assert "| rf/lognorm(0.00,1.00) | 1.54 | 1.00 [" in md and "**reproduced**" in md
  for name in ("claim2_formulations", "claim3_backbones", "claim4_loss_vs_quality", "claim5_steps"):
    assert os.path.getsize(os.path.join(out, f"{name}.png")) > 1000
  assert os.path.isfile(os.path.join(out, "claim1_holdout", "holdout.png"))
  assert json.load(open(os.path.join(out, "study.json")))["claim2_formulations"]["best"] == "rf/lognorm(0.00,1.00)"


def test_a_claim_the_numbers_contradict_is_reported_not_reproduced(workdir, tmp_path):
  # the formulations part alone, with the paper's order reversed in quality
  root = str(tmp_path / "w")
  sweep = _sweep("formulations")
  for run in sweep_lib.plan(sweep):
    cfg = sweep_lib.run_config(sweep, run)
    place = list(claims.PAPER_FORMULATION_RANK).index(cfg.flow.formulation)
    quality = {n: (0.03 + 0.01 * place, 0.5 - 0.02 * place) for n in (5, 25)}
    _write_run(os.path.join(root, "formulations"), sweep, run, {1200: 0.3}, quality)
  result = study.study(root, str(tmp_path / "out"), plots=False)
  assert result["missing_parts"] == ["scaling", "backbones"] and "claim1_frontier" not in result
  c2 = result["claim2_formulations"]
  assert c2["best"] == "edm(-1.20,1.20)" and c2["spearman_with_paper"]["rho"] == pytest.approx(-1.0)
  assert not c2["reproduced"]
  assert result["claim4_correlation"]["all"]["rho"] is None  # every loss equal: no correlation to report
  md = open(str(tmp_path / "out" / "study.md")).read()
  assert "Parts not run yet: scaling, backbones" in md and "**not reproduced**" in md


def test_claim5_ignores_depths_near_chance():
  def run(depth, many, few):
    return {
      "depth": depth,
      "name": f"d{depth}",
      "points": [{"step": 100}],
      "quality": {25: {"sample_accuracy": many, "chance": {"all": CHANCE}}, 5: {"sample_accuracy": few}},
    }

  result = claims.claim_steps([run(1, 0.008, 0.0), run(2, 0.05, 0.04), run(3, 0.08, 0.07), run(4, 0.1, 0.095)])
  assert result["usable_depths"] == [2, 3, 4] and result["rows"][0]["relative_drop"] == pytest.approx(1.0)
  assert result["depth_vs_drop"]["rho"] == pytest.approx(-1.0) and result["reproduced"]


def test_study_command_on_a_directory_without_parts_names_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match="launch/scaling_demo.sh .* --part scaling"):
    cli.main(["study", str(tmp_path), "--out", str(tmp_path / "out")])


@pytest.mark.parametrize("part,num_workers", [("scaling", 2), ("backbones", 3), ("formulations", 4)])
def test_workers_share_a_sweep_without_splitting_a_stable_run_from_its_branches(part, num_workers):
  runs = sweep_lib.plan(_sweep(part))
  shares = [runner.worker_share(runs, i, num_workers) for i in range(num_workers)]
  assert set().union(*shares) == {r.name for r in runs} and sum(map(len, shares)) == len(runs)  # a partition
  for r in runs:
    if r.branch_of:
      assert [r.branch_of in s for s in shares] == [r.name in s for s in shares]
  groups = [{r.branch_of or r.name for r in runs if r.name in s} for s in shares]
  assert max(map(len, groups)) - min(map(len, groups)) <= 1  # whole groups, dealt evenly
  with pytest.raises(ValueError, match="give I/N"):
    cli.main(["run", f"{STUDY}:/data,{part}", "--sweep_dir", "/tmp/x", "--worker", "2"])
  with pytest.raises(ValueError, match="worker 2 of 2"):
    runner.worker_share(runs, 2, 2)


@pytest.mark.parametrize(
  "args,message",
  [(["--part", "sizes"], "unknown part 'sizes'"), (["--jobs", "two"], "--jobs 'two'"), (["--fast"], "unknown option")],
)
def test_the_study_launcher_refuses_bad_arguments_before_any_work(tmp_path, args, message):
  import subprocess

  done = subprocess.run(
    ["bash", os.path.join(REPO, "launch", "scaling_demo.sh"), str(tmp_path / "w"), *args],
    capture_output=True,
    text=True,
    env=dict(os.environ, PYTHON="/nonexistent/python"),
  )
  assert done.returncode == 2 and message in done.stderr and not os.path.exists(tmp_path / "w")


def test_each_run_is_judged_against_its_own_chance_level():
  def run(name, acc, chance):
    return {"name": name, "quality": {25: {"sample_accuracy": acc, "chance": {"all": chance}}}}

  # a blob-drawing model is read generously (high chance); a sharp one at 5% is far above its own
  g = claims.regime([run("blobs", 0.07, 0.05), run("sharp", 0.05, 0.004), run("mid", 0.03, 0.01)])
  assert g["best"]["run"] == "sharp" and g["best"]["times_chance"] == pytest.approx(12.5) and g["discriminates"]
  assert g["worst"]["run"] == "blobs" and g["chance"] == 0.01
  assert not claims.regime([run("a", 0.05, 0.01), run("b", 0.02, 0.01)])["discriminates"]


def test_an_error_predicted_by_an_untrusted_law_is_marked_not_a_result():
  held = {"frontier_rel_error": None, "untrusted_frontier_rel_error": 0.061, "parametric_rel_error": -0.02}
  held["untrusted_parametric_rel_error"] = None
  assert study._error(held, "frontier") == "not a result (+6.1% from an untrusted law)"
  assert study._error(held, "parametric") == "-2.0%"


def test_the_relative_drop_interval_reflects_how_many_samples_were_scored():
  small = claims.drop_interval(0.13, 0.078, 192)
  large = claims.drop_interval(0.13, 0.078, 192 * 16)
  assert small[0] < 0.4 < small[1] and large[0] < 0.4 < large[1]
  assert (large[1] - large[0]) < (small[1] - small[0]) / 3  # about 1/sqrt(16) as wide
  assert claims.drop_interval(0.0, 0.0, 192) is None and claims.drop_interval(0.1, 0.05, None) is None
