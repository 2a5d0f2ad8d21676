"""The fits know their limits (sd3_jax.scaling.trust, laws, and their marks in analyze's output).

Each way a law cannot be trusted is produced from tiny synthetic data and must be flagged: a
parameter at a bound of its search range, fewer model sizes than the law needs, no more points
than parameters plus one, a bootstrap interval spanning more than a factor 10 (or 0), an isoFLOP
minimum outside its sizes. A healthy family (six sizes, true laws plus small noise) must be
trusted, for several noise draws. The issue's case, one run's four validation points fitted as a
compute law, is flagged by `sd3-scaling analyze`: marked in scaling.json and on the plot, one
warning line, and the headline says "not a result" instead of the law.
"""

import json
import os

import numpy as np
import pytest

from sd3_jax import scaling
from sd3_jax.scaling import analysis, cli, laws, plots, trust

B = 30  # bootstrap resamples


def _codes(warnings):
  return {w["code"] for w in warnings}


def _run(name, n, seed, *, noise=0.003, images=np.logspace(8, 10, 5), law=None):
  """A run as analysis.read_run gives it: validation points of a Chinchilla-like L(N, D)."""
  rng = np.random.default_rng(seed)
  law = law or (lambda n, d: 1.69 + 406.4 / n**0.34 + 410.7 / d**0.28)
  points = []
  for i, d in enumerate(images):
    loss = float(law(n, d) * np.exp(rng.normal(0, noise)))
    c = 6 * n * d
    points.append(
      dict(step=i + 1, images=d, compute=c, compute_6nd=c, loss=loss, val_loss=loss, rf_loss=None, levels={})
    )
  return dict(
    name=name,
    dir=f"/runs/{name}",
    config={},
    sample_metrics={},
    depth=int(round(n ** (1 / 3))),
    width=64 * int(round(n ** (1 / 3))),
    width_per_depth=64.0,
    branch_of=None,
    branch_step=0,
    own_compute=6 * n * 64 * len(images),
    diverged=None,
    params={"total": n, "non_embedding": n},
    flops_per_step=6 * n * 64,
    total_steps=len(images),
    budget=None,
    finished=True,
    points=points,
    sample_accuracy=None,
    part_accuracy=None,
  )


def _single_run():
  """The issue's case: one model's own curve, four validation points, the loss leveling off
  faster than any C^-alpha with alpha <= 5 can."""
  c = np.array([5e12, 1e13, 1.5e13, 2e13])
  loss = 0.267 + 2e101 * c**-8.0
  run = _run("demo", 1e6, 0, images=c / 6e6)
  for p, y in zip(run["points"], loss):
    p.update(compute=float(p["compute"]), loss=float(y), val_loss=float(y))
  return run


# --------------------------------------------------------------------------------------------
# One test per way a fit fails


def test_a_parameter_at_a_bound_of_its_search_range():
  c = np.logspace(12, 13, 8)
  fit = scaling.fit_power_law(c, 0.267 + 1e100 * c**-8.0, num_bootstrap=0)  # steeper than alpha <= 5
  assert fit.at_bound == {"alpha": "upper"} and fit.alpha == pytest.approx(5.0)
  (w,) = [w for w in trust.power_law(fit) if w["code"] == "at_bound"]
  assert (w["param"], w["side"]) == ("alpha", "upper") and "upper bound of its search range" in w["message"]
  # The tolerance is a slack on a range's width: near a bound is not at it.
  assert trust.bound_hits([0.0, 4.9996, 2.0], [(0, 5), (0, 5), (-25, 3)], "xyz") == {"x": "lower", "y": "upper"}
  assert trust.bound_hits([0.01, 4.99], [(0, 5), (0, 5)], "xy") == {}


def test_fewer_model_sizes_than_the_law_needs():
  runs = [_run(f"d{i}", n, i) for i, n in enumerate((1e6, 1e8))]  # 2 sizes, 5 points each
  found, _, _ = laws.fit_laws(runs, num_bootstrap=0)
  for name in ("frontier", "parametric"):
    (w,) = [w for w in found[name]["warnings"] if w["code"] == "few_sizes"]
    assert (w["have"], w["need"], w["what"]) == (2, 3, "model sizes"), name
    assert found[name]["trusted"] is False
  # Sizes the caller does not know are not checked; three are enough.
  fit = scaling.fit_power_law(*zip(*[(p["compute"], p["loss"]) for r in runs for p in r["points"]]), num_bootstrap=0)
  assert "few_sizes" not in _codes(trust.power_law(fit)) | _codes(trust.power_law(fit, num_sizes=3))


def test_no_more_points_than_parameters_plus_one():
  c = np.logspace(15, 19, 5)
  loss = 1.5 + 5e4 * c**-0.3
  four = trust.power_law(scaling.fit_power_law(c[:4], loss[:4], num_bootstrap=0))
  assert [w["message"] for w in four if w["code"] == "few_points"] == ["4 points for 3 parameters (needs at least 5)"]
  assert "few_points" not in _codes(trust.power_law(scaling.fit_power_law(c, loss, num_bootstrap=0)))


def test_an_interval_spanning_more_than_a_factor_10():
  rng = np.random.default_rng(0)
  c = np.logspace(15, 16, 12)  # a decade of compute, 5% noise: E cannot be told apart from A C^-alpha
  loss = (1.5 + 5e4 * c**-0.3) * np.exp(rng.normal(0, 0.05, 12))
  fit = scaling.fit_power_law(c, loss, num_bootstrap=B, seed=0)
  wide = {w["param"] for w in trust.power_law(fit, num_sizes=3) if w["code"] == "wide_interval"}
  assert "e" in wide
  # The rule itself: a factor 10 passes, more does not; an interval holding 0 never does.
  assert trust.interval_problem("alpha", 0.05, 0.5) is None
  assert trust.interval_problem("alpha", 0.05, 0.51)["ratio"] == pytest.approx(10.2)
  assert "includes 0" in trust.interval_problem("a", -0.1, 0.4)["message"]
  assert trust.interval_problem("a", -0.6, -0.4) is None
  # A is judged at the data's centre: its interval in original units spans a factor > 10 while
  # the law is well determined (healthy data, below), and that is not a warning.
  c = np.logspace(15, 19, 16)
  good = scaling.fit_power_law(c, (1.5 + 5e4 * c**-0.3) * np.exp(rng.normal(0, 0.01, 16)), num_bootstrap=B)
  assert good.ci["a"][1] / good.ci["a"][0] > 3 * good.ci_at_centre["a"][1] / good.ci_at_centre["a"][0]
  assert trust.power_law(good, num_sizes=4) == []


def _isoflop_data(budgets, spread=(-1, 1), per_budget=7, shift=1.0):
  rng = np.random.default_rng(2)
  out = ([], [], [])
  for c in budgets:
    n_opt = 0.05 * c**0.5
    for n in n_opt * shift * np.logspace(*spread, per_budget):
      for lst, v in zip(out, (c, n, 3.0 * c**-0.05 * np.exp(0.02 * np.log(n / n_opt) ** 2 + rng.normal(0, 0.001)))):
        lst.append(v)
  return out


def test_isoflop_fits_are_judged_like_the_others():
  good = scaling.fit_isoflop(*_isoflop_data((1e17, 1e18, 1e19, 1e20)), num_bootstrap=B)
  assert trust.isoflop(good) == []
  three = trust.isoflop(scaling.fit_isoflop(*_isoflop_data((1e17, 1e18, 1e19)), num_bootstrap=0))
  assert [w["have"] for w in three if w["code"] == "few_points"] == [3]
  thin = trust.isoflop(scaling.fit_isoflop(*_isoflop_data((1e17, 1e18, 1e19, 1e20), per_budget=4), num_bootstrap=0))
  assert len([w for w in thin if w["code"] == "few_points" and "parabola" in w["message"]]) == 4
  off = scaling.fit_isoflop(*_isoflop_data((1e17, 1e18, 1e19, 1e20), spread=(0, 1), shift=3.0), num_bootstrap=0)
  assert len([w for w in trust.isoflop(off) if w["code"] == "vertex_outside"]) == 4


# --------------------------------------------------------------------------------------------
# A healthy family is trusted; the single run is not a result


@pytest.mark.parametrize("seed", [0, 1])
def test_a_healthy_family_is_trusted(seed):
  runs = [_run(f"d{i}", n, 10 * seed + i) for i, n in enumerate(np.logspace(6, 8, 6))]
  found, law, par = laws.fit_laws(runs, num_bootstrap=B, seed=seed)
  for name in ("frontier", "parametric"):
    assert found[name]["trusted"], (name, trust.summary(found[name]["warnings"]))
    assert found[name]["warnings"] == []
  assert par.alpha == pytest.approx(0.34, abs=0.05) and par.beta == pytest.approx(0.28, abs=0.03)
  result = {"runs": runs, "fit_runs": [r["name"] for r in runs], "holdout_runs": [], **found}
  assert laws.warning_line(result) is None
  shown = analysis.headline(result)
  assert shown["frontier"]["alpha"] == law.alpha and shown["parametric"]["beta"] == par.beta


def test_a_single_runs_curve_is_not_a_compute_law(tmp_path, monkeypatch, capsys):
  run = _single_run()
  monkeypatch.setattr(analysis, "find_runs", lambda dirs: ["/runs/demo"])
  monkeypatch.setattr(analysis, "read_run", lambda d, **kw: run)
  out = str(tmp_path / "analysis")
  cli.main(["analyze", "/runs", "--out", out, "--num_bootstrap", str(B)])
  captured = capsys.readouterr()
  saved = json.load(open(os.path.join(out, "scaling.json")))
  front = saved["frontier"]
  assert front["trusted"] is False and front["fit"]["alpha"] == pytest.approx(5.0)
  assert {"at_bound", "few_sizes", "few_points"} <= _codes(front["warnings"])
  assert saved["parametric"]["fit"] is None and saved["parametric"]["trusted"] is False
  # One warning line on stderr that names both laws; the headline shows no law as a result.
  lines = [line for line in captured.err.splitlines() if line.startswith("warning:")]
  assert len(lines) == 1
  assert "compute frontier L(C) not a result: alpha = 5 sits at the upper bound" in lines[0]
  assert "1 distinct model size, the law needs at least 3" in lines[0]
  assert "parametric L(N, D) not fitted" in lines[0]
  shown = json.loads(captured.out[: captured.out.rindex("}") + 1])
  assert shown["frontier"].startswith("not a result: ") and "C^-" not in captured.out
  # The plot draws the law dashed, labelled with its reasons instead of its equation.
  assert os.path.getsize(os.path.join(out, "loss_vs_compute.png")) > 1000
  labels = plots.loss_vs_compute([run], saved, str(tmp_path / "again.png"), scaling.PowerLawFit(**front["fit"]))
  (label,) = [x for x in labels if "L(C)" in x]
  assert label.startswith("fitted L(C), untrusted, not a result: alpha = 5") and "C^-" not in label


def test_predictions_from_an_untrusted_law_are_withheld():
  runs = [_run(f"d{i}", n, i) for i, n in enumerate((1e6, 1e8))]
  found, law, par = laws.fit_laws(runs, num_bootstrap=0)
  result = {"runs": runs, "fit_runs": ["d0", "d1"], "holdout_runs": ["big"], **found}
  big = _run("big", 1e9, 5)
  result["holdout"] = [laws.predict(big, law, par, "non_embedding", result)]
  h = result["holdout"][0]
  assert h["parametric_law_trusted"] is False and h["points"][0]["predicted"] is not None  # kept, marked
  shown = analysis.headline(result)["holdout big"]
  assert all(v.startswith("not a result") for v in shown.values())
