"""The study's figures (PNG, matplotlib, no display needed).

* ``loss_vs_compute.png``: validation loss against training compute, log-log, one curve per run
  coloured by depth, the frontier points and the fitted L(C) (the paper's Fig. 8 style);
  a law that cannot be trusted (``laws``) is drawn dashed and labelled with its reasons, never
  with its equation, here and on the other figures;
* ``loss_vs_steps.png``: validation loss against steps per run;
* ``isoflop.png``: final loss against N per budget with each parabola (isoFLOP sweeps only);
* ``holdout.png``: held-out runs, measured against predicted by L(N, D);
* ``loss_vs_accuracy.png``: final loss against held-out sample accuracy (scored runs only);
* ``transfer_<key>.png``: final loss against a swept hyperparameter, one curve per width, one
  panel per setting of the other varied keys (SP beside muP, as Zheng et al. 2025 plot it).
"""

from __future__ import annotations

import os
import textwrap
from typing import Sequence

import numpy as np


def pyplot():
  """matplotlib.pyplot on the Agg backend (no display needed), imported on first use."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def _colors(runs):
  plt = pyplot()
  depths = sorted({r["depth"] for r in runs})
  cmap = plt.get_cmap("viridis")
  return {d: cmap(i / max(len(depths) - 1, 1)) for i, d in enumerate(depths)}


def _label(run, result):
  axes = {k: v for k, v in next(x for x in result["runs"] if x["name"] == run["name"])["axes"].items()}
  extra = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in axes.items())
  return f"{run['name']}" + (f" ({extra})" if extra else "")


def untrusted_label(entry: dict, what: str) -> str:
  """The legend of a law that is not a result: what it is and why, wrapped."""
  from sd3_jax.scaling import trust

  return textwrap.fill(f"{what}, untrusted, not a result: {trust.summary(entry['warnings'])}", 70)


def loss_vs_compute(runs, result, path, law=None) -> list[str]:
  """The figure; returns its legend labels."""
  plt = pyplot()
  colors = _colors(runs)
  fit_names, held = set(result["fit_runs"]), set(result["holdout_runs"])
  fig, ax = plt.subplots(figsize=(7, 4.8), dpi=110)
  for r in runs:
    c = [p["compute"] for p in r["points"]]
    y = [p["loss"] for p in r["points"]]
    style = "o-" if r["name"] in fit_names else ("s--" if r["name"] in held else "x:")
    ax.plot(
      c,
      y,
      style,
      color=colors[r["depth"]],
      ms=4,
      lw=1.2,
      alpha=1.0 if r["name"] in fit_names | held else 0.5,
      label=f"d={r['depth']}"
      + (" (held out)" if r["name"] in held else "")
      + ("" if r["name"] in fit_names | held else f" {r['name']}"),
    )
  front = result["frontier"]["points"]
  if front:
    ax.plot([p["compute"] for p in front], [p["loss"] for p in front], "k*", ms=9, label="frontier (fitted)")
  if law is not None:
    all_c = [p["compute"] for r in runs for p in r["points"]]
    grid = np.logspace(np.log10(min(all_c)), np.log10(max(all_c)), 100)
    if result["frontier"].get("trusted", True):
      style, label = "k-", f"L = {law.e:.3g} + {law.a:.3g} C^-{law.alpha:.3g} (R² log {law.r2_log:.3f})"
    else:
      style, label = "r--", untrusted_label(result["frontier"], "fitted L(C)")
    ax.plot(grid, law.predict(grid), style, lw=1.5, alpha=0.7, label=label)
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("training compute (FLOPs, exact train-step count x steps)")
  ax.set_ylabel(f"validation loss ({result['loss']})")
  ax.grid(alpha=0.3, which="both")
  handles, labels = ax.get_legend_handles_labels()
  seen = dict(zip(labels, handles))
  ax.legend(seen.values(), seen.keys(), fontsize=7)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return list(seen)


def loss_vs_steps(runs, result, path) -> None:
  plt = pyplot()
  colors = _colors(runs)
  fig, ax = plt.subplots(figsize=(7, 4.8), dpi=110)
  for r in runs:
    ax.plot(
      [p["step"] for p in r["points"]],
      [p["loss"] for p in r["points"]],
      "o-",
      ms=3,
      color=colors[r["depth"]],
      label=_label(r, result),
    )
  ax.set_yscale("log")
  ax.set_xlabel("step")
  ax.set_ylabel(f"validation loss ({result['loss']})")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def isoflop_plot(runs, result, path, param_count) -> None:
  plt = pyplot()
  fit, trusted = result["isoflop"]["fit"], result["isoflop"].get("trusted", True)
  fig, ax = plt.subplots(figsize=(6, 4.5), dpi=110)
  budgets = sorted({r["budget"] for r in runs if r["budget"]})
  cmap = plt.get_cmap("plasma")
  for i, b in enumerate(budgets):
    members = sorted((r for r in runs if r["budget"] == b), key=lambda r: r["params"][param_count])
    n = [r["params"][param_count] for r in members]
    color = cmap(i / max(len(budgets) - 1, 1))
    ax.plot(n, [r["points"][-1]["loss"] for r in members], "o", color=color, label=f"C = {b:.2g}")
    prof = next((p for p in fit["profiles"] if p["budget"] == b), None)
    if prof:
      x = np.linspace(np.log(min(n)), np.log(max(n)), 50)
      ax.plot(np.exp(x), np.exp(np.polyval(prof["coeffs"], x)), "-" if trusted else "--", color=color)
      ax.plot([prof["n_opt"]], [prof["loss_opt"]], "k+", ms=10)
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel(f"parameters ({param_count})")
  ax.set_ylabel("final validation loss")
  if trusted:
    ax.set_title(f"isoFLOP profiles; N_opt ~ C^{fit['a']:.2f}")
  else:
    ax.set_title(untrusted_label(result["isoflop"], "isoFLOP N_opt(C)"), fontsize=7)
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def holdout_plot(result, path) -> None:
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(6, 4.5), dpi=110)
  for h in result["holdout"]:
    pts = [p for p in h["points"] if p["predicted"] is not None]
    ax.plot([p["step"] for p in h["points"]], [p["measured"] for p in h["points"]], "o-", label=f"{h['run']} measured")
    if pts:
      ax.plot(
        [p["step"] for p in pts],
        [p["predicted"] for p in pts],
        "s--",
        label=f"{h['run']} predicted by L(N, D) (mean |err| {h['parametric_mean_abs_rel_error']:.1%})"
        if h.get("parametric_law_trusted", True)
        else f"{h['run']} predicted by an untrusted L(N, D): not a result",
      )
  ax.set_xlabel("step")
  ax.set_ylabel(f"validation loss ({result['loss']})")
  ax.set_title("held-out run: predicted from the smaller runs")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def accuracy_plot(runs, result, path) -> None:
  plt = pyplot()
  colors = _colors(runs)
  fig, ax = plt.subplots(figsize=(6, 4.5), dpi=110)
  for r in runs:
    if r["sample_accuracy"] is None:
      continue
    ax.plot(r["points"][-1]["loss"], r["part_accuracy"], "o", color=colors[r["depth"]], ms=7)
    ax.annotate(
      r["name"], (r["points"][-1]["loss"], r["part_accuracy"]), fontsize=6, xytext=(3, 3), textcoords="offset points"
    )
  s = result["spearman"]
  rho = s["part_accuracy"]["rho"] if s else None
  ax.set_xlabel(f"final validation loss ({result['loss']})")
  ax.set_ylabel("held-out sample accuracy, mean over parts")
  ax.set_title("lower loss, better samples?" + (f"  Spearman rho = {rho:.2f}" if rho is not None else ""))
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def transfer_plot(groups: Sequence[dict], path: str) -> None:
  plt = pyplot()
  fig, axes = plt.subplots(1, len(groups), figsize=(4.6 * len(groups), 4.2), dpi=110, squeeze=False, sharey=True)
  cmap = plt.get_cmap("viridis")
  done = [c["final_loss"] for g in groups for w in g["curves"].values() for c in w if c["final_loss"] is not None]
  top = max(done) if done else 1.0
  for ax, g in zip(axes[0], groups):
    widths = sorted(g["curves"], key=int)
    for i, w in enumerate(widths):
      color = cmap(i / max(len(widths) - 1, 1))
      ok = [c for c in g["curves"][w] if c["final_loss"] is not None]
      ax.plot([c["value"] for c in ok], [c["final_loss"] for c in ok], "o-", color=color, ms=4, label=f"width {w}")
      bad = [c["value"] for c in g["curves"][w] if c["final_loss"] is None]
      if bad:  # diverged: drawn at the top of the panel
        ax.plot(bad, [top] * len(bad), "x", color=color, ms=7)
      if g["best"][w] is not None:
        best = next(c for c in ok if c["value"] == g["best"][w])
        ax.plot([best["value"]], [best["final_loss"]], "*", color=color, ms=12, mec="k")
    setting = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in g["fixed"].items())
    ax.set_title(
      f"{setting}{', ' if setting else ''}d={g['depth']}, {g['steps']} steps\nbest moves {g['shift']} grid step(s)",
      fontsize=9,
    )
    ax.set_xscale("log", base=2)
    ax.set_xlabel(g["key"])
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
  axes[0][0].set_ylabel("final validation loss (x: diverged)")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def write_all(
  runs: Sequence[dict], result: dict, out: str, *, law=None, param_count: str = "non_embedding"
) -> list[str]:
  """Every figure that applies to this study; returns their paths."""
  paths = [os.path.join(out, "loss_vs_compute.png"), os.path.join(out, "loss_vs_steps.png")]
  loss_vs_compute(runs, result, paths[0], law)
  loss_vs_steps(runs, result, paths[1])
  if result.get("isoflop") and result["isoflop"]["fit"]:
    paths.append(os.path.join(out, "isoflop.png"))
    isoflop_plot(runs, result, paths[-1], param_count)
  if result.get("holdout"):
    paths.append(os.path.join(out, "holdout.png"))
    holdout_plot(result, paths[-1])
  if any(r["sample_accuracy"] is not None for r in runs):
    paths.append(os.path.join(out, "loss_vs_accuracy.png"))
    accuracy_plot(runs, result, paths[-1])
  for key in sorted({g["key"] for g in result.get("transfer") or []}):
    paths.append(os.path.join(out, f"transfer_{key.rsplit('.', 1)[-1]}.png"))
    transfer_plot([g for g in result["transfer"] if g["key"] == key], paths[-1])
  return paths
