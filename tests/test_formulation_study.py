"""The formulation study's tooling: the sweep axis, retired config keys, and the analysis that
groups and ranks runs by formulation, by the rf yardstick and by sample metrics at each step
count (run directories written by hand here: the analysis reads only files)."""

import csv
import json
import os

import pytest

from sd3_jax import config as config_lib
from sd3_jax import flow
from sd3_jax.scaling import analysis, ranking
from sd3_jax.scaling import sweep as sweep_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_config_default_and_retired_keys():
  c = config_lib.base_config()
  assert c.flow.formulation == flow.DEFAULT
  with pytest.raises(ValueError, match=r"flow.sampler is retired.*flow.formulation='rf/cosmap'"):
    config_lib.load_config_file(os.path.join(REPO, "configs", "tiny.py"), overrides={"flow.sampler": "cosmap"})
  old = {"flow": {"sampler": "logit_normal", "logit_mean": 1.0, "logit_std": 0.6, "mode_scale": 1.29}}
  assert config_lib.formulation_name(old) == "rf/lognorm(1.00,0.60)"
  assert config_lib.formulation_name({"flow": {"sampler": "mode", "mode_scale": 1.29}}) == "rf/mode(1.29)"
  assert config_lib.formulation_name({"flow": {"formulation": "v/cos", "sampler": None}}) == "v/cos"


def test_formulation_sweep_plans_one_run_per_formulation():
  sweep = sweep_lib.load_sweep(os.path.join(REPO, "configs", "scaling", "formulations.py") + ":/data")
  runs = sweep_lib.plan(sweep)
  assert len(runs) == 22
  names = [r.name for r in runs]
  assert "d2_s400" in names and "d2_s1200_formulation-edm--1.20-1.20" in names
  assert all(set(n) <= set("abcdefghijklmnopqrstuvwxyz0123456789_-.") for n in names)
  table_1 = set(sweep.grids[0]["axes"]["flow.formulation"])
  assert len(table_1) == 11 and {sweep_lib.run_config(sweep, r).flow.formulation for r in runs} == table_1
  # an axis value written another way is the same formulation: no second run
  sweep.grids = [dict(name="g", depths=(2,), lengths=(4,), axes={"flow.formulation": ("rf/lognorm(0,1)", "v/cos")})]
  assert [r.name for r in sweep_lib.plan(sweep)] == ["d2_s4", "d2_s4_formulation-v_cos"]
  sweep.grids = [dict(name="g", depths=(2,), lengths=(4,), axes={"flow.formulation": ("v/cosine",)})]
  with pytest.raises(ValueError, match="grid 'g': unknown formulation 'v/cosine'"):
    sweep_lib.plan(sweep)


def test_pareto_and_ranks():
  assert ranking.pareto_ranks([(1, 1), (2, 2), (0, 3), (0, 0)]) == [2, 1, 1, 3]
  assert ranking.ranks([0.3, 0.1, None, 0.1], higher_better=False) == [3.0, 1.5, None, 1.5]
  assert ranking.higher_is_better("clip_score@25") and not ranking.higher_is_better("fid_clip@5")


def _run_dir(root, name, config, rows, sample=None):
  d = os.path.join(root, name)
  step = max(r["step"] for r in rows)
  ckpt = os.path.join(d, "checkpoints", str(step))
  os.makedirs(os.path.join(ckpt, "config"))
  open(os.path.join(ckpt, "commit_success.txt"), "w").close()
  with open(os.path.join(ckpt, "config", "metadata"), "w") as f:
    json.dump(config, f)
  with open(os.path.join(d, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  if sample is not None:
    with open(os.path.join(d, "sample_eval.json"), "w") as f:
      json.dump(sample, f)


def test_analysis_ranks_formulations_by_yardstick_and_sample_metrics(tmp_path):
  base = config_lib.base_config()
  base.model.depth, base.total_steps = 2, 100
  base.eval.num_steps = 25
  # (formulation, own val/loss, yardstick, CLIP / FID at 5 and 25 steps)
  table = [
    ("rf/lognorm(0.00,1.00)", 0.50, 0.40, (0.25, 40.0), (0.26, 30.0)),
    ("eps/linear", 0.05, 0.45, (0.20, 60.0), (0.27, 29.0)),
    ("edm(-1.20,1.20)", 0.90, 0.60, (0.21, 50.0), (0.20, 45.0)),
  ]
  for i, (name, own, rf, s5, s25) in enumerate(table):
    cfg = base.to_dict()
    cfg["flow"]["formulation"] = name
    rows = [
      {"step": 100, "val/loss": own, "val/rf_loss": rf, "val/loss_t0.143": own},
      {"step": 100, "eval/steps5/clip_score": s5[0], "eval/steps5/fid_clip": s5[1]},
      {"step": 100, "eval/steps25/clip_score": s25[0], "eval/steps25/fid_clip": s25[1], "eval/num_images": 8},
    ]
    _run_dir(
      str(tmp_path / "sweep"), f"run{i}", cfg, rows, sample={"sample_accuracy": 0.1 * i, "sampler": {"steps": 20}}
    )
  # an rf run written before flow.formulation existed, at another length
  old = base.to_dict()
  old["flow"] = {"sampler": "uniform", "logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29, "shift": 1.0}
  old["total_steps"] = 50
  _run_dir(str(tmp_path / "sweep"), "old", old, [{"step": 50, "val/loss": 0.7}])

  out = str(tmp_path / "report")
  result = analysis.analyze([str(tmp_path / "sweep")], out, num_bootstrap=0, plots=False)
  by_name = {r["name"]: r for r in result["runs"]}
  assert by_name["old"]["axes"]["flow.formulation"] == "rf"  # translated from its retired keys
  assert by_name["run1"]["sample_metrics"] == {
    "clip_score@5": 0.20, "fid_clip@5": 60.0, "clip_score@25": 0.27, "fid_clip@25": 29.0, "sample_accuracy@20": 0.1,
  }  # fmt: skip
  (group,) = [g for g in result["comparisons"] if g["key"] == "flow.formulation"]
  assert group["ranked_by"] == "val/rf_loss" and group["steps"] == 100
  rows = {r["value"]: r for r in group["rows"]}
  assert [r["value"] for r in group["rows"]] == ["rf/lognorm(0.00,1.00)", "eps/linear", "edm(-1.20,1.20)"]
  assert rows["eps/linear"]["ranks"]["clip_score@25"] == 1.0 and rows["eps/linear"]["ranks"]["fid_clip@5"] == 3.0
  # the paper's rank: at 5 steps rf beats both in CLIP and FID and edm beats eps; at 25 steps
  # eps beats rf, and both beat edm
  paper = {v: r["paper_rank"] for v, r in rows.items()}
  assert paper == {"rf/lognorm(0.00,1.00)": 1.5, "eps/linear": 2.0, "edm(-1.20,1.20)": 2.5}
  table_csv = list(csv.DictReader(open(os.path.join(out, "comparisons.csv"))))
  assert [r["value"] for r in table_csv] == [r["value"] for r in group["rows"]]
  runs_csv = list(csv.DictReader(open(os.path.join(out, "runs.csv"))))
  assert {r["run"]: r["rf_loss"] for r in runs_csv}["run2"] == "0.6"
  # fitting the yardstick: runs that never logged it (the old one) have no points to fit
  fitted = analysis.analyze([str(tmp_path / "sweep")], out, loss="val/rf_loss", num_bootstrap=0, plots=False)
  assert {r["name"]: r["final_loss"] for r in fitted["runs"]} == {"run0": 0.40, "run1": 0.45, "run2": 0.60}
  # --where matches formulations however they are written
  picked = analysis.analyze(
    [str(tmp_path / "sweep")], out, where={"flow.formulation": "rf/lognorm(0,1)"}, num_bootstrap=0, plots=False
  )
  assert picked["fit_runs"] == ["run0"]


def test_periodic_evaluation_at_several_step_counts(monkeypatch):
  from sd3_jax.evaluation import scoring

  calls = []

  def fake_evaluate(model, params, conditioner, prompts, *, num_steps, formulation, **kw):
    calls.append((num_steps, formulation))
    return scoring.EvalResult({"clip_score": 20.0 + num_steps, "num_images": 2}, None, None)

  monkeypatch.setattr(scoring, "evaluate", fake_evaluate)
  f = flow.get_formulation("v/cos")
  settings = dict(prompts=("a", "b"), num_steps=28)
  one = scoring.PeriodicEvaluator(None, **settings)(None, None, None, latent_shape=(4, 4, 3), formulation=f)
  assert one == {"eval/clip_score": 48.0, "eval/num_images": 2} and calls == [(28, f)]
  calls.clear()
  several = scoring.PeriodicEvaluator(None, step_counts=(5, 50), **settings)
  out = several(None, None, None, latent_shape=(4, 4, 3), formulation=f)
  assert out == {
    "eval/steps5/clip_score": 25.0, "eval/steps5/num_images": 2,
    "eval/steps50/clip_score": 70.0, "eval/steps50/num_images": 2,
  }  # fmt: skip
  assert calls == [(5, f), (50, f)]
  with pytest.raises(ValueError, match="step_counts"):
    scoring.PeriodicEvaluator(None, step_counts=(0,), **settings)
