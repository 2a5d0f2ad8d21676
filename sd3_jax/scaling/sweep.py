"""Sweeps: a base experiment config, a depth family and the axes to vary, as a list of runs.

A sweep file (``configs/scaling/*.py``) is an ml_collections ``get_config()`` returning
``sweep_config()`` filled in:

  base_config      path of the experiment config every run starts from (relative paths are
                   resolved against the sweep file's directory, then the working directory)
  base_overrides   {dotted key: value} applied to every run (data paths, batch size, ...)
  width_per_depth  the family's width rule: hidden = width_per_depth x d, d heads
  val_points       validation points per run: val.every = steps // val_points (a loss curve)
  grids            one or more {name, depths, lengths | budgets, widths, axes}: ``lengths`` are
                   step counts; ``budgets`` are training FLOPs (an isoFLOP sweep: each depth's
                   step count is derived from its exact FLOPs per step); ``widths`` are
                   width_per_depth values to sweep instead of the sweep's one (hidden = w x d,
                   still d heads: a width sweep at a fixed depth, as muP transfer needs);
                   ``axes`` maps any other config key to the values to cross with
                   (``flow.formulation``, ``optimizer.learning_rate``, ``model.parametrization``, ...)
  cooldown_branches  True: the lengths of one model are one warmup-stable-decay run to the
                   longest and a cooldown branch from it for each shorter one (scaling/branches.py)

Every (grid, depth, width, length or budget, axis values) is one run, named from what it varies
(``d4_s1200``, ``d4_s1200_formulation-rf``, ``d6_C2e13``, ``d2_s400_w32_learning_rate-0.003``);
a value equal to the base config's is left out of the name, so grids that share a run share its
directory.
"""

from __future__ import annotations

import ast
import dataclasses
import itertools
import os
import shlex
from typing import Any, Mapping, Sequence

import ml_collections

from sd3_jax import config as config_lib
from sd3_jax import flow
from sd3_jax.models import mmdit
from sd3_jax.scaling import branches, family

# Keys a sweep sets itself for every run; an axis or base override must not set them.
RUN_KEYS = (
  "model.depth",
  "model.hidden_size",
  "model.num_heads",
  "total_steps",
  "val.every",
  "checkpoint_every",
  "keep_checkpoint_steps",
  "branch_from",
)


def sweep_config() -> ml_collections.ConfigDict:
  """The sweep schema with its defaults (see the module docstring)."""
  return ml_collections.ConfigDict(
    dict(
      name="sweep",
      base_config="",
      base_overrides=dotted({}),
      width_per_depth=family.PAPER_WIDTH_PER_DEPTH,
      val_points=8,
      cooldown_branches=False,
      grids=[],
    )
  )


def dotted(overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """{dotted key: value} as a ConfigDict that keeps the dots (for ``base_overrides``)."""
  return ml_collections.ConfigDict(dict(overrides), allow_dotted_keys=True)


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of a sweep: its name, grids, place in the family and config overrides.

  ``compute`` is what the model at its last step cost from scratch; a cooldown branch
  (``branch_of`` the stable run, starting at ``branch_step``) spends only ``own_flops`` of it."""

  name: str
  grids: tuple[str, ...]
  depth: int
  width_per_depth: int
  steps: int
  budget: float | None
  overrides: dict[str, Any]
  params: dict[str, int]
  compute: family.RunCompute
  branch_of: str | None = None
  branch_step: int = 0

  @property
  def own_flops(self) -> int:
    return self.compute.flops_per_step * (self.steps - self.branch_step)

  def to_dict(self) -> dict:
    return {
      "name": self.name,
      "grids": list(self.grids),
      "depth": self.depth,
      "width_per_depth": self.width_per_depth,
      "steps": self.steps,
      "budget": self.budget,
      "overrides": {k: _jsonable(v) for k, v in self.overrides.items()},
      "params": self.params,
      "compute": dataclasses.asdict(self.compute),
      "compute_6nd_over_exact": self.compute.approx_ratio,
      "branch_of": self.branch_of,
      "branch_step": self.branch_step,
      "own_flops": self.own_flops,
    }


def _jsonable(v):
  return list(v) if isinstance(v, tuple) else v


def load_sweep(path: str, overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
  """A sweep file ``PATH`` or ``PATH:ARG`` (``get_config(ARG)``) with {key: value} overrides."""
  arg = None
  if not os.path.isfile(path) and ":" in path:
    path, arg = path.rsplit(":", 1)
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"no sweep file {path!r}: give the path of a Python file whose get_config() "
      "returns sd3_jax.scaling.sweep_config() filled in"
    )
  sweep = config_lib.load_config_file(path, arg=arg)
  sweep.unlock()
  for key, value in (overrides or {}).items():
    if key not in sweep:
      raise ValueError(f"unknown sweep key {key!r}; known: {sorted(sweep.keys())}")
    sweep[key] = value
  base = sweep.base_config
  if not base:
    raise ValueError(f"sweep {path!r} sets no base_config (the experiment config file every run starts from)")
  if not os.path.isabs(base):
    beside = os.path.join(os.path.dirname(os.path.abspath(path)), base)
    sweep.base_config = os.path.abspath(beside if os.path.isfile(beside) else base)
  sweep.base_config = os.path.normpath(sweep.base_config)
  if not os.path.isfile(sweep.base_config):
    raise FileNotFoundError(
      f"the sweep's base_config {base!r} does not exist (looked beside {path} and in {os.getcwd()})"
    )
  return sweep


def parse_assignment(text: str) -> tuple[str, Any]:
  """'key=value' with value a Python literal when it parses as one, else a string."""
  if "=" not in text:
    raise ValueError(f"expected key=value, got {text!r}")
  key, raw = text.split("=", 1)
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    value = raw
  return key.strip(), value


def _short(key: str, value: Any) -> str:
  """'flow.formulation', 'rf/lognorm(0.00,1.00)' -> 'formulation-rf_lognorm-0.00-1.00' (a
  directory name without characters a shell must quote)."""
  text = "-".join(str(v) for v in value) if isinstance(value, (tuple, list)) else str(value)
  text = f"{key.rsplit('.', 1)[-1]}-{text}"
  for a, b in (("/", "_"), (" ", ""), ("(", "-"), (")", ""), (",", "-")):
    text = text.replace(a, b)
  return text


def _budget_name(budget: float) -> str:
  mantissa, exponent = f"{budget:.2e}".split("e")
  mantissa = mantissa.rstrip("0").rstrip(".")
  return f"{mantissa}e{int(exponent)}"


def _lookup(config: ml_collections.ConfigDict, key: str) -> Any:
  node = config
  for part in key.split("."):
    if part not in node:
      raise ValueError(f"unknown experiment config key {key!r} (no {part!r}); see sd3_jax/config.py")
    node = node[part]
  return node


def _check_grid(grid: Mapping, index: int) -> None:
  name = grid.get("name", f"grid{index}")
  unknown = set(grid) - {"name", "depths", "lengths", "budgets", "widths", "axes"}
  if unknown:
    raise ValueError(
      f"grid {name!r} has unknown keys {sorted(unknown)}; a grid has name, depths, lengths or budgets, widths and axes"
    )
  if any(int(w) < 1 for w in grid.get("widths") or ()):
    raise ValueError(f"grid {name!r}: widths (width_per_depth values) must be >= 1, got {list(grid['widths'])}")
  if not grid.get("depths"):
    raise ValueError(f"grid {name!r} lists no depths")
  if bool(grid.get("lengths")) == bool(grid.get("budgets")):
    raise ValueError(f"grid {name!r} must give exactly one of lengths (steps) or budgets (FLOPs)")
  for key in dict(grid.get("axes") or {}):
    if key in RUN_KEYS:
      raise ValueError(f"grid {name!r}: {key!r} is set by the sweep itself (depth and length); it cannot be an axis")


def plan(sweep: ml_collections.ConfigDict) -> list[Run]:
  """The sweep's runs, in order (grid by grid, depth-major), duplicates merged."""
  if not sweep.grids:
    raise ValueError("the sweep has no grids: add at least one {name, depths, lengths | budgets, axes}")
  if sweep.val_points < 1:
    raise ValueError(f"val_points must be >= 1, got {sweep.val_points}")
  base_overrides = dict(sweep.base_overrides)
  clash = set(base_overrides) & set(RUN_KEYS)
  if clash:
    raise ValueError(f"base_overrides sets {sorted(clash)}, which the sweep sets per run; remove them")
  base = config_lib.load_config_file(sweep.base_config, overrides=base_overrides)
  runs: dict[str, Run] = {}
  configs: dict[str, ml_collections.ConfigDict] = {}
  for gi, grid in enumerate(sweep.grids):
    grid = dict(grid)
    _check_grid(grid, gi)
    gname = grid.get("name", f"grid{gi}")
    axes = {k: tuple(v) for k, v in dict(grid.get("axes") or {}).items()}
    if "flow.formulation" in axes:  # one name per formulation: 'rf/lognorm(0,1)' is the default's
      try:
        axes["flow.formulation"] = tuple(flow.canonical_name(v) for v in axes["flow.formulation"])
      except ValueError as e:
        raise ValueError(f"grid {gname!r}: {e}") from None
    lengths = [("steps", int(s)) for s in grid.get("lengths") or ()]
    budgets = [("budget", float(b)) for b in grid.get("budgets") or ()]
    widths = [int(w) for w in grid.get("widths") or (sweep.width_per_depth,)]
    for depth, width, (kind, amount), values in itertools.product(
      [int(d) for d in grid["depths"]], widths, lengths + budgets, itertools.product(*axes.values())
    ):
      # A value equal to the base config's changes nothing: left out of the overrides and the
      # name, so that grids sharing a run share its directory.
      axis_values = {k: v for k, v in zip(axes, values) if v != _lookup(base, k)}
      family_overrides = {"model.depth": depth, "model.hidden_size": width * depth, "model.num_heads": depth}
      cfg = config_lib.load_config_file(
        sweep.base_config, overrides={**base_overrides, **axis_values, **family_overrides}
      )
      try:  # a bad formulation name (or shift) is refused before anything trains
        flow.get_formulation(cfg.flow.formulation, shift=cfg.flow.shift)
      except ValueError as e:
        raise ValueError(f"grid {gname!r}: {e}") from None
      mcfg = mmdit.config_from_preset(**cfg.model)
      per_step = family.run_compute(
        mcfg,
        latent_size=cfg.data.latent_size,
        context_len=cfg.data.context_len,
        batch_size=cfg.global_batch_size,
        steps=1,
      ).flops_per_step
      steps = amount if kind == "steps" else family.steps_for_budget(amount, per_step)
      if steps < 1:
        raise ValueError(f"grid {gname!r}: training lengths must be >= 1 step, got {steps}")
      every = max(1, steps // sweep.val_points)
      overrides = {
        **base_overrides,
        **axis_values,
        **family_overrides,
        "total_steps": steps,
        "val.every": every,
        "checkpoint_every": every,
      }
      name = f"d{depth}_s{steps}" if kind == "steps" else f"d{depth}_C{_budget_name(amount)}"
      name += f"_w{width}" if width != sweep.width_per_depth else ""
      name += "".join(f"_{_short(k, v)}" for k, v in axis_values.items())
      run = Run(
        name=name,
        grids=(gname,),
        depth=depth,
        width_per_depth=width,
        steps=steps,
        budget=amount if kind == "budget" else None,
        overrides=overrides,
        params=family.param_counts(mcfg),
        compute=family.run_compute(
          mcfg,
          latent_size=cfg.data.latent_size,
          context_len=cfg.data.context_len,
          batch_size=cfg.global_batch_size,
          steps=steps,
        ),
      )
      if name in runs:
        if runs[name].overrides != run.overrides:
          raise ValueError(f"two grids define run {name!r} differently: {runs[name].overrides} vs {run.overrides}")
        if gname not in runs[name].grids:
          runs[name] = dataclasses.replace(runs[name], grids=runs[name].grids + (gname,))
      else:
        runs[name] = run
        configs[name] = cfg
  if sweep.cooldown_branches:
    return branches.attach(list(runs.values()), configs)
  return list(runs.values())


def _flag_value(value: Any) -> str:
  if isinstance(value, (tuple, list)):
    return repr(tuple(value))
  return repr(value) if isinstance(value, float) else str(value)


def run_overrides(run: Run, sweep_dir: str | None) -> dict[str, Any]:
  """``run.overrides`` plus, for a cooldown branch, where it starts (needs ``sweep_dir``)."""
  if not run.branch_of:
    return dict(run.overrides)
  if sweep_dir is None:
    raise ValueError(f"run {run.name} is a cooldown branch: its config needs the sweep directory")
  return {**run.overrides, "branch_from": branches.branch_point(sweep_dir, run)}


def command_line(sweep: ml_collections.ConfigDict, run: Run, sweep_dir: str, python: str = "python") -> str:
  """The ``python -m sd3_jax.main ...`` line that trains ``run`` (for a pod scheduler or SLURM).
  A branch's line may start only once its stable run has committed the branch step."""
  workdir = f"{sweep_dir.rstrip('/')}/{run.name}" if "://" in sweep_dir else os.path.join(sweep_dir, run.name)
  parts = [python, "-m", "sd3_jax.main", "--config", sweep.base_config, "--workdir", workdir]
  parts += [f"--config.{k}={_flag_value(v)}" for k, v in run_overrides(run, sweep_dir).items()]
  return " ".join(shlex.quote(p) for p in parts)


def run_config(sweep: ml_collections.ConfigDict, run: Run, sweep_dir: str | None = None) -> ml_collections.ConfigDict:
  """The experiment config of ``run`` (what ``command_line`` would give the trainer)."""
  return config_lib.load_config_file(sweep.base_config, overrides=run_overrides(run, sweep_dir))


def total_compute(runs: Sequence[Run]) -> dict[str, float]:
  """What the sweep costs (``flops``: a stable run's shared part counted once, each branch its
  cooldown only), what its runs would cost from scratch, and the difference."""
  spent = float(sum(r.own_flops for r in runs))
  scratch = float(sum(r.compute.flops for r in runs))
  return {
    "flops": spent,
    "flops_from_scratch": scratch,
    "flops_saved": scratch - spent,
    "saved_fraction": (scratch - spent) / scratch if scratch else 0.0,
    "flops_6nd": float(sum(r.compute.flops_6nd * (r.steps - r.branch_step) / r.steps for r in runs)),
    "images": float(sum(r.compute.images * (r.steps - r.branch_step) // r.steps for r in runs)),
  }
