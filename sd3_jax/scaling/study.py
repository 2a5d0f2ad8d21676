"""The toy study's report (``sd3-scaling study WORKDIR --out OUT``): the paper's five claims.

``study(workdir, out)`` reads the parts ``bash launch/scaling_demo.sh`` trains
(``WORKDIR/{scaling,formulations,backbones}``, ``configs/scaling/toy_study.py``), judges each claim
(``claims``) and writes ``OUT/study.json``, ``OUT/study.md`` (one table per claim with the paper's
result beside ours and the verdict) and one figure per claim. A part that has not run yet is
reported as missing; a claim is judged only from what ran.

Figures (PNG): ``claim2_formulations.png`` (quality at both step counts per formulation, mean and
interval over seeds), ``claim3_backbones.png`` (yardstick loss over training and quality against
compute, per backbone), ``claim4_loss_vs_quality.png`` (every scored run), ``claim5_steps.png``
(quality at few and many steps per depth). Claim 1's figures are the analysis's own
(``claim1_all/loss_vs_compute.png``, ``claim1_holdout/holdout.png``).
"""

from __future__ import annotations

import os
import platform
from typing import Any

import numpy as np

from sd3_jax.storage import fileutil
from sd3_jax.scaling import claims
from sd3_jax.scaling.plots import pyplot

MANY, FEW = claims.MANY, claims.FEW


def study(workdir: str, out: str, *, num_bootstrap: int = 200, plots: bool = True) -> dict[str, Any]:
  """Reads every part under ``workdir`` that has runs, writes OUT/study.json, OUT/study.md and
  the figures; returns the result."""
  os.makedirs(out, exist_ok=True)
  parts: dict[str, list[dict]] = {}
  for part in claims.PARTS:
    try:
      parts[part] = claims.read_part(os.path.join(workdir, part))
    except FileNotFoundError:  # not run yet: no directory, or no run in it (analysis.find_runs)
      continue
    for r in parts[part]:
      r["part"] = part
  if not parts:
    raise FileNotFoundError(
      f"{workdir} holds none of the study's parts {claims.PARTS}: run `bash launch/scaling_demo.sh {workdir} --part scaling` first"
    )
  every = [r for members in parts.values() for r in members]
  result: dict[str, Any] = {
    "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
    "parts": {p: len(parts.get(p, [])) for p in claims.PARTS},
    "missing_parts": [p for p in claims.PARTS if not parts.get(p)],
    "regime": claims.regime(every),
    "throughput": claims.throughput_table(every),
  }
  if parts.get("scaling"):
    result["claim1_frontier"] = claims.claim_frontier(os.path.join(workdir, "scaling"), out, num_bootstrap)
    result["claim5_steps"] = claims.claim_steps(parts["scaling"])
  if parts.get("formulations"):
    result["claim2_formulations"] = claims.claim_formulations(parts["formulations"])
  if parts.get("backbones"):
    result["claim3_backbones"] = claims.claim_backbones(parts["backbones"])
  result["claim4_correlation"] = claims.claim_correlation(every)
  fileutil.atomic_json(os.path.join(out, "study.json"), result, indent=1)
  if plots:
    figures(parts, result, out)
  fileutil.atomic_write_text(os.path.join(out, "study.md"), markdown(result))
  return result


def _errorbar(ax, x, cells, **kw):
  mean = np.array([c["mean"] if c["mean"] is not None else np.nan for c in cells])
  low = np.array([c["low"] if c["low"] is not None else m for c, m in zip(cells, mean)])
  high = np.array([c["high"] if c["high"] is not None else m for c, m in zip(cells, mean)])
  ax.errorbar(x, mean, yerr=[mean - low, high - mean], fmt="o", capsize=3, **kw)


def figures(parts: dict[str, list[dict]], result: dict[str, Any], out: str) -> list[str]:
  plt = pyplot()
  written = []
  chance = result["regime"].get("chance")
  if "claim2_formulations" in result:
    rows = result["claim2_formulations"]["rows"]
    x = np.arange(len(rows))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
    _errorbar(axes[2], x, [r["rf_loss"] for r in rows], color="black")
    axes[2].set_ylabel("final val/rf_loss (the yardstick)")
    for i, (n, c) in enumerate(((FEW, "tab:orange"), (MANY, "tab:blue"))):
      _errorbar(axes[0], x + (i - 0.5) * 0.2, [r[f"sample_accuracy@{n}"] for r in rows], color=c, label=f"{n} steps")
      _errorbar(axes[1], x + (i - 0.5) * 0.2, [r[f"reading_distance@{n}"] for r in rows], color=c, label=f"{n} steps")
    if chance:
      axes[0].axhline(chance, color="grey", ls=":", label="chance (median run)")
    axes[0].set_ylabel("held-out sample accuracy (all parts)")
    axes[1].set_ylabel("reading distance (lower is better)")
    for ax in axes:
      ax.set_xticks(x, [r["formulation"] for r in rows], rotation=35, ha="right", fontsize=8)
    for ax in axes[:2]:
      ax.legend(fontsize=8)
    fig.suptitle("formulations at equal compute: mean and 95% interval over seeds (paper's Table 1 order)")
    fig.tight_layout()
    written.append(_save(fig, out, "claim2_formulations.png"))
  if parts.get("backbones"):
    runs = parts["backbones"]
    names = sorted({claims.backbone_of(r) for r in runs})
    cmap = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.3))
    for i, name in enumerate(names):
      members = sorted((r for r in runs if claims.backbone_of(r) == name), key=lambda r: r["points"][-1]["compute"])
      stable = members[-1]
      axes[0].plot([p["compute"] for p in stable["points"]], [p["loss"] for p in stable["points"]], "-", color=cmap(i))
      axes[0].plot(
        [m["points"][-1]["compute"] for m in members], [m["final_rf_loss"] for m in members], "o", color=cmap(i)
      )
      acc = [claims.quality(m, MANY) for m in members]
      axes[1].plot([m["points"][-1]["compute"] for m in members], acc, "o-", color=cmap(i), label=name)
      distance = [claims.quality(m, MANY, "reading_distance") for m in members]
      axes[2].plot([m["points"][-1]["compute"] for m in members], distance, "o-", color=cmap(i), label=name)
    if chance:
      axes[1].axhline(chance, color="grey", ls=":", label="chance (median run)")
    axes[0].set_ylabel("validation loss (val/rf_loss)")
    axes[1].set_ylabel(f"held-out sample accuracy, {MANY} steps")
    axes[2].set_ylabel(f"reading distance, {MANY} steps (lower is better)")
    for ax in axes:
      ax.set_xscale("log")
      ax.set_xlabel("training FLOPs")
    axes[1].legend(fontsize=8)
    fig.suptitle("backbones at equal compute (curve: the longest run; dots: each budget's cooldown end)")
    fig.tight_layout()
    written.append(_save(fig, out, "claim3_backbones.png"))
  scored = [r for members in parts.values() for r in members if claims.quality(r, MANY) is not None]
  if scored:
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for part, marker in zip(claims.PARTS, "osD"):
      members = [r for r in scored if r.get("part") == part]
      if members:
        ax.plot(
          [r["final_rf_loss"] for r in members],
          [claims.quality(r, MANY) for r in members],
          marker,
          label=part,
          alpha=0.8,
        )
    if chance:
      ax.axhline(chance, color="grey", ls=":", label="chance (median run)")
    c = result["claim4_correlation"]["all"]
    title = "final validation loss against sample quality"
    if c["rho"] is not None:
      title += f"\nSpearman rho = {c['rho']:.2f} (p = {c['p_value']:.1e}, {c['num_runs']} runs)"
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("final val/rf_loss")
    ax.set_ylabel(f"held-out sample accuracy, {MANY} steps")
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(_save(fig, out, "claim4_loss_vs_quality.png"))
  if "claim5_steps" in result:
    rows = result["claim5_steps"]["rows"]
    fig, ax = plt.subplots(figsize=(6, 4))
    depths = [r["depth"] for r in rows]
    for n, c in ((FEW, "tab:orange"), (MANY, "tab:blue")):
      ax.plot(depths, [r[f"sample_accuracy@{n}"] for r in rows], "o-", color=c, label=f"{n} sampling steps")
    if chance:
      ax.axhline(chance, color="grey", ls=":", label="chance (median run)")
    ax.set_xlabel("depth d")
    ax.set_ylabel("held-out sample accuracy")
    ax.set_xticks(depths)
    ax.legend(fontsize=8)
    ax.set_title("few against many sampling steps, per depth (longest runs)", fontsize=10)
    fig.tight_layout()
    written.append(_save(fig, out, "claim5_steps.png"))
  return written


def _save(fig, out: str, name: str) -> str:
  path = os.path.join(out, name)
  fig.savefig(path, dpi=110)
  pyplot().close(fig)
  return path


def _f(v, fmt="{:.3f}") -> str:
  return "-" if v is None else fmt.format(v)


def _pct(v) -> str:
  return "-" if v is None else f"{100 * v:+.1f}%"


def _range(interval) -> str:
  return "" if not interval else f" [{_pct(interval[0])}, {_pct(interval[1])}]"


def _error(h: dict, law: str) -> str:
  """A held-out error; one predicted by a law that is not trusted is marked as not a result."""
  if h.get(f"untrusted_{law}_rel_error") is not None:
    return f"not a result ({_pct(h[f'untrusted_{law}_rel_error'])} from an untrusted law)"
  return _pct(h[f"{law}_rel_error"])


def _cell(c: dict, fmt="{:.3f}") -> str:
  if c["mean"] is None:
    return "-"
  if c["low"] is None:
    return fmt.format(c["mean"])
  return f"{fmt.format(c['mean'])} [{fmt.format(c['low'])}, {fmt.format(c['high'])}]"


def _verdict(ok: bool) -> str:
  return "**reproduced**" if ok else "**not reproduced**"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
  """A markdown table's lines."""
  return [f"| {' | '.join(header)} |", "|" + "---|" * len(header)] + [f"| {' | '.join(r)} |" for r in rows]


def _rho_row(name: str, c: dict) -> list[str]:
  return [name, _f(c["rho"], "{:.2f}"), _f(c["p_value"], "{:.2g}")]


def markdown(result: dict[str, Any]) -> str:
  """The report: the regime check, throughput and one section per claim, paper beside ours."""
  lines = [f"# The toy study's report ({result['machine']})", ""]
  if result["missing_parts"]:
    lines += [f"Parts not run yet: {', '.join(result['missing_parts'])}; their claims are not judged.", ""]
  g = result["regime"]
  if g.get("scored_runs"):
    lines += [
      "## Does quality discriminate?",
      "",
      "Each run's chance level is its own samples scored against shuffled captions (median over runs "
      f"{g['chance']:.4f}). Best run {g['best']['run']}: {g['best']['accuracy']:.3f} against {g['best']['chance']:.4f} "
      f"({g['best']['times_chance']:.1f}x chance); worst {g['worst']['run']}: {g['worst']['accuracy']:.3f} against "
      f"{g['worst']['chance']:.4f} ({g['worst']['times_chance']:.1f}x). "
      f"The regime {'meets' if g['discriminates'] else 'misses'} the 10x-chance bar.",
      "",
    ]
  lines += [
    "## Throughput",
    "",
    "Per run, from the exact FLOPs (compilation and checkpoints excluded); a part trained with `--jobs N` ran "
    "N runs at once, each single-threaded.",
    "",
  ]
  lines += _table(
    ["part", "depth", "backbone", "parameters", "GFLOP / step", "step time", "GFLOP/s"],
    [
      [t["part"], str(t["depth"]), t["backbone"], f"{t['params']:,}", f"{t['gflop_per_step']:.1f}"]
      + [_f(t["step_time"], "{:.3f} s"), _f(t["gflops_per_sec"], "{:.1f}")]
      for t in result["throughput"]
    ],
  )
  lines.append("")
  c1 = result.get("claim1_frontier")
  if c1:
    fit = c1["frontier"]["fit"]
    law = (
      f"L = {fit['e']:.3f} + {fit['a']:.3g} C^-{fit['alpha']:.3f}, log R^2 {fit['r2_log']:.3f}"
      if fit and c1["frontier"]["trusted"]
      else f"{c1['frontier']['why_not']} (log R^2 {_f(c1['r2_log'])})"
    )
    lines += [
      "## Claim 1: loss against compute (paper: Fig. 8, a clean power law; held-out sizes predicted)",
      "",
      f"Frontier law over every depth: {law}. Parametric L(N, D): "
      f"{'trusted' if c1['parametric']['trusted'] else c1['parametric']['why_not']}. "
      f"Fits without the largest depth: frontier {c1['holdout_fit']['frontier']}, parametric "
      f"{c1['holdout_fit']['parametric']}.",
      "",
    ]
    lines += _table(
      ["held-out run", "steps", "measured loss", "frontier error", "parametric error"],
      [
        [h["run"], str(h["final_step"]), f"{h['measured']:.4f}", _error(h, "frontier"), _error(h, "parametric")]
        for h in c1["holdout"]
      ],
    )
    lines += [
      "",
      f"Lengths predicted within 5%: frontier {c1['lengths_within_5pct']['frontier']}, parametric "
      f"{c1['lengths_within_5pct']['parametric']} (goal: log R^2 >= 0.97 and >= 2 lengths each). "
      f"{_verdict(c1['reproduced'])}.",
      "",
    ]
  c2 = result.get("claim2_formulations")
  if c2:
    lines += [
      "## Claim 2: formulations (paper: Table 1, rf/lognorm(0.00,1.00) ranks first)",
      "",
      f"Ranked by {c2['ranked_by']}; mean and 95% interval over seeds.",
      "",
    ]
    metrics = [
      f"sample_accuracy@{FEW}",
      f"sample_accuracy@{MANY}",
      f"reading_distance@{FEW}",
      f"reading_distance@{MANY}",
    ]
    lines += _table(
      ["formulation", "paper's rank", "our rank", *[m.replace("sample_", "").replace("reading_", "") for m in metrics]]
      + ["val/rf_loss"],
      [
        [r["formulation"], _f(r["paper_rank"], "{:.2f}"), _cell(r["rank"], "{:.2f}"), *[_cell(r[m]) for m in metrics]]
        + [_cell(r["rf_loss"], "{:.4f}")]
        for r in c2["rows"]
      ],
    )
    s = c2["spearman_with_paper"]
    lines += [
      "",
      f"Best by our rank: {c2['best']}. Spearman between our mean rank and the paper's: "
      f"{_f(s['rho'], '{:.2f}')} (p {_f(s['p_value'], '{:.2g}')}). {_verdict(c2['reproduced'])} "
      "(rf/lognorm(0.00,1.00) first and a positive rank correlation with the paper).",
      "",
    ]
  c3 = result.get("claim3_backbones")
  if c3:
    lines += [f"## Claim 3: backbones (paper: Fig. 4, {claims.PAPER_BACKBONES})", ""]
    metrics = [f"sample_accuracy@{MANY}", f"reading_distance@{MANY}", f"sample_accuracy@{FEW}"]
    lines += _table(
      ["backbone", "parameters", "steps", "training FLOPs", "val/rf_loss"]
      + [m.replace("sample_", "").replace("reading_", "") for m in metrics],
      [
        [r["backbone"], f"{r['params']:,}", str(r["steps"]), f"{r['compute']:.3g}", f"{r['rf_loss']:.4f}"]
        + [_f(r[m]) for m in metrics]
        for r in c3["rows"]
      ],
    )
    k = c3["checks"]
    if k:
      lines += [
        "",
        f"At the largest budget the lowest loss is {k['lowest_loss_at_largest_budget']}'s, the highest "
        f"{k['highest_loss_at_largest_budget']}'s, the best accuracy {k['best_accuracy_at_largest_budget']}'s, the "
        f"lowest reading distance {k['best_distance_at_largest_budget']}'s; at the "
        f"smallest the lowest loss is {k['lowest_loss_at_smallest_budget']}'s. MM-DiT3 against MM-DiT: "
        f"{_pct(k.get('mmdit3_vs_mmdit_rel_loss'))} loss. {_verdict(c3['reproduced'])} (an MM-DiT lowest and the "
        "DiT highest in loss at the largest budget).",
      ]
    lines.append("")
  c4 = result["claim4_correlation"]
  lines += ["## Claim 4: validation loss predicts quality (paper: section 5.3, strongly correlated)", ""]
  lines += _table(
    ["runs", "Spearman rho (final val/rf_loss, accuracy)", "p-value"],
    [_rho_row(f"{name} ({c['num_runs']})", c) for name, c in c4.items() if isinstance(c, dict) and name != "beside"],
  )
  lines += [
    "",
    f"Goal rho <= -0.8 over all runs: {_verdict(c4['reproduced'])}.",
    "",
    "Beside the verdict, all runs:",
    "",
  ]
  lines += _table(
    ["quality measure", "Spearman rho with final val/rf_loss", "p-value"],
    [_rho_row(f"{name} ({c['num_runs']} runs)", c) for name, c in c4.get("beside", {}).items()],
  )
  lines.append("")
  c5 = result.get("claim5_steps")
  if c5:
    lines += [
      "## Claim 5: larger models need fewer steps (paper: relative drop 50 -> 5 steps 4.30% at d=15, 2.71% at d=38)",
      "",
    ]
    lines += _table(
      ["depth", f"accuracy@{MANY}", f"accuracy@{FEW}", "relative drop [95%]", "part-accuracy drop"]
      + [f"distance@{MANY}", f"distance@{FEW}", "above 2x chance"],
      [
        [str(r["depth"]), _f(r[f"sample_accuracy@{MANY}"]), _f(r[f"sample_accuracy@{FEW}"])]
        + [_pct(r["relative_drop"]) + _range(r["relative_drop_interval"]), _pct(r["part_relative_drop"])]
        + [_f(r[f"reading_distance@{MANY}"]), _f(r[f"reading_distance@{FEW}"]), "yes" if r["above_2x_chance"] else "no"]
        for r in c5["rows"]
      ],
    )
    t = c5["depth_vs_drop"]
    lines += [
      "",
      f"Depths whose accuracy is above 2x chance: {c5['usable_depths']}; Spearman (depth, drop) "
      f"{_f(t and t['rho'], '{:.2f}')}. {_verdict(c5['reproduced'])} (the drop shrinks with depth).",
      "",
    ]
  return "\n".join(lines)
