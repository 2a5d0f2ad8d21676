r"""Scaling-law studies from the command line (``python -m sd3_jax.scaling`` or ``sd3-scaling``).

run SWEEP[:ARG] --sweep_dir DIR [--print_commands] [--only NAME ...] [--worker I/N] [--set KEY=VALUE ...]
    train every run of a sweep file here, one after another (finished runs are skipped, a
    killed sweep resumes), or worker I's share of N side by side, or print one
    `python -m sd3_jax.main ...` line per run
analyze RUN_OR_SWEEP_DIR ... --out DIR [--loss val/loss | --levels interior | --levels 0.143,0.286]
        [--holdout largest | --holdout NAME,NAME] [--where KEY=VALUE ...] [--num_bootstrap N]
        [--transfer KEY]
    runs.csv, scaling.json (fits with bootstrap 95% intervals, each marked trusted or not; compute
    spent and saved by cooldown branches; hyperparameter transfer across width) and plots; a law
    that cannot be trusted is shown as "not a result" and named on one warning line
coord_check --config CONFIG [--set KEY=VALUE ...] --widths W W W ... --out DIR
    muP's coordinate check: a few steps at each width under SP and muP, per-layer output and
    update sizes against width (coord_check.png, coord_check.json)
toy_data --workdir DIR      the toy study's text encoders and coloured-shapes records
study WORKDIR --out DIR     the toy study's report (launch/scaling_demo.sh): the paper's five claims
    judged from the runs of its parts, one table and figure per claim (study.md, study.json)
score RUN_OR_SWEEP_DIR ... --text_encoders DIR [--sampling_steps 5 10 25 50]
    held-out sample accuracy of each run (the demo's shapes checker, the run's formulation) and
    its reading distance to real renders, at each sampling step count, RUN/sample_eval.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Sequence

from sd3_jax import command


def _run(args) -> None:
  from sd3_jax.scaling import runner, sweep as sweep_lib

  overrides = dict(sweep_lib.parse_assignment(a) for a in args.set)
  sweep = sweep_lib.load_sweep(args.sweep, overrides)
  if args.print_commands:
    runs = sweep_lib.plan(sweep)
    for run in runs:
      if not args.only or run.name in args.only:
        remote = "://" in args.sweep_dir  # gs://... as the trainer takes it; local paths made absolute
        if run.branch_of:  # the order a scheduler must keep, beside the lines (stdout stays one line a run)
          print(f"# {run.name} starts once {run.branch_of} has committed step {run.branch_step}", file=sys.stderr)
        print(sweep_lib.command_line(sweep, run, args.sweep_dir if remote else os.path.abspath(args.sweep_dir)))
    return
  trained = runner.run_sweep(sweep, args.sweep_dir, only=args.only, worker=_parse_worker(args.worker))
  print(f"trained {len(trained)} run(s) into {args.sweep_dir}: {', '.join(trained) or 'all were finished'}")


def _parse_worker(text: str | None) -> tuple[int, int] | None:
  if not text:
    return None
  try:
    i, n = (int(x) for x in text.split("/"))
  except ValueError:
    raise ValueError(f"--worker {text!r}: give I/N, e.g. --worker 0/2 (worker 0 of 2)") from None
  return i, n


def _analyze(args) -> None:
  from sd3_jax.scaling import analysis, laws

  where = dict(_parse_where(w) for w in args.where)
  result = analysis.analyze(
    args.dirs,
    args.out,
    loss=args.loss,
    levels=args.levels,
    holdout=args.holdout,
    where=where,
    num_bootstrap=args.num_bootstrap,
    seed=args.seed,
    param_count=args.params,
    plots=not args.no_plots,
    transfer_key=args.transfer,
  )
  print(json.dumps(analysis.headline(result), indent=1))
  warning = laws.warning_line(result)
  if warning:
    print(warning, file=sys.stderr)
  print(
    f"wrote {os.path.join(args.out, 'runs.csv')}, {os.path.join(args.out, 'scaling.json')}"
    + ("" if args.no_plots else " and plots")
  )


def _parse_where(text: str):
  from sd3_jax.scaling import sweep as sweep_lib

  return sweep_lib.parse_assignment(text)


def _coord_check(args) -> None:
  from sd3_jax import config as config_lib
  from sd3_jax.storage import fileutil
  from sd3_jax.scaling import coord_check, sweep as sweep_lib

  overrides = dict(sweep_lib.parse_assignment(a) for a in args.set)
  config = config_lib.load_config_file(args.config, overrides=overrides)
  if len(args.widths) < 2:
    raise ValueError(f"--widths needs at least two widths, got {args.widths}")
  results = [coord_check.coord_data(config, args.widths, p, steps=args.steps, seed=args.seed) for p in ("sp", "mup")]
  os.makedirs(args.out, exist_ok=True)
  summary = {r["parametrization"]: coord_check.summary(r) for r in results}
  fileutil.atomic_json(
    os.path.join(args.out, "coord_check.json"),
    {"summary": summary, "slopes": {r["parametrization"]: coord_check.slopes(r) for r in results}, "data": results},
    indent=1,
  )
  coord_check.plot(results, os.path.join(args.out, "coord_check.png"))
  print(json.dumps(summary, indent=1))
  print(f"wrote {os.path.join(args.out, 'coord_check.png')} and coord_check.json")


def _toy_data(args) -> None:
  from sd3_jax.scaling import toy

  print(json.dumps(toy.prepare_data(args.workdir, num_train=args.num_train, num_val=args.num_val), indent=1))


def _study(args) -> None:
  from sd3_jax.scaling import study

  result = study.study(args.workdir, args.out, num_bootstrap=args.num_bootstrap, plots=not args.no_plots)
  verdicts = {k: v["reproduced"] for k, v in result.items() if k.startswith("claim") and "reproduced" in v}
  print(
    json.dumps({"regime": result["regime"], "missing_parts": result["missing_parts"], "reproduced": verdicts}, indent=1)
  )
  print(f"wrote {os.path.join(args.out, 'study.md')}, {os.path.join(args.out, 'study.json')}")


def _score(args) -> None:
  from sd3_jax.scaling import analysis, toy

  for run_dir in analysis.find_runs(args.dirs):
    r = toy.score_run(
      run_dir,
      args.text_encoders,
      samples_per_prompt=args.samples_per_prompt,
      sampling_steps=args.sampling_steps,
      cfg_scale=args.cfg_scale,
    )
    print(
      f"{os.path.basename(run_dir)}: sample accuracy {r['sample_accuracy']:.3f}, parts {r['part_accuracy']:.3f}, "
      f"reading distance {r['reading_distance']:.3f}"
    )


_INTERRUPTED = {  # what a Ctrl-C keeps, by subcommand
  "run": "the finished runs are kept; rerun the same command to go on (it skips them)",
  "analyze": "nothing was written (--out comes at the end)",
  "toy_data": "the finished parts are kept; rerun the same command to go on",
  "score": "the runs already scored are kept (RUN/sample_eval.json); rerun the same command to go on",
  "study": "nothing is lost: the report is written at the end from the runs on disk; rerun it",
}


def build_parser() -> argparse.ArgumentParser:
  p = command.ArgumentParser(
    prog="sd3-scaling",
    description=__doc__.split("\n\n")[0],
    epilog=__doc__.split("\n\n", 1)[1],
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  sub = p.add_subparsers(dest="command", required=True)

  r = sub.add_parser("run", help="train (or print the commands of) every run of a sweep")
  r.add_argument("sweep", help="sweep file (configs/scaling/*.py), optionally PATH:ARG for get_config(ARG)")
  r.add_argument("--sweep_dir", required=True, help="one training workdir per run goes under it")
  r.add_argument("--print_commands", action="store_true", help="print one `python -m sd3_jax.main` line per run")
  r.add_argument("--only", nargs="+", default=[], help="only these run names")
  r.add_argument(
    "--worker",
    metavar="I/N",
    help="train only worker I's share of N (a stable run and its branches stay together): run N such "
    "commands side by side to use more cores with small models (launch/scaling_demo.sh --jobs)",
  )
  r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a sweep key")
  r.set_defaults(fn=_run)

  a = sub.add_parser("analyze", help="runs.csv, scaling.json and plots from finished or running runs")
  a.add_argument("dirs", nargs="+", help="run directories or directories holding runs")
  a.add_argument("--out", required=True, help="output directory")
  a.add_argument("--loss", default="val/loss", help="the logged key to fit (default val/loss)")
  a.add_argument(
    "--levels",
    help="fit the mean of these logged t levels instead: 'interior' (0 < t < 1) or a comma list such as 0.143,0.286",
  )
  a.add_argument(
    "--holdout", help="'largest' (the deepest model) or comma-separated run names, left out of the fits and predicted"
  )
  a.add_argument(
    "--where",
    action="append",
    default=[],
    metavar="KEY=VALUE",
    help="fit only runs whose config has KEY=VALUE (default: each varied key at its most common value)",
  )
  a.add_argument(
    "--params",
    default="non_embedding",
    choices=("non_embedding", "total"),
    help="N of the fits: joint-block parameters, or all but the positional table",
  )
  a.add_argument("--num_bootstrap", type=int, default=200, help="bootstrap resamples per fit")
  a.add_argument("--seed", type=int, default=0, help="bootstrap seed")
  a.add_argument("--no_plots", action="store_true", help="skip the PNG plots")
  a.add_argument(
    "--transfer",
    default="optimizer.learning_rate",
    help="the swept hyperparameter whose best value is compared across widths (if it varies)",
  )
  a.set_defaults(fn=_analyze)

  c = sub.add_parser("coord_check", help="muP's coordinate check: layer sizes against width under SP and muP")
  c.add_argument("--config", required=True, help="experiment config whose model is scaled in width")
  c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
  c.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128, 256], help="hidden sizes (heads fixed)")
  c.add_argument("--steps", type=int, default=3, help="training steps at each width")
  c.add_argument("--seed", type=int, default=0)
  c.add_argument("--out", required=True, help="output directory")
  c.set_defaults(fn=_coord_check)

  st = sub.add_parser("study", help="the toy study's report: the paper's five claims from its parts' runs")
  st.add_argument("workdir", help="the study's WORKDIR (bash launch/scaling_demo.sh WORKDIR): its parts' sweep dirs")
  st.add_argument("--out", required=True, help="output directory (study.md, study.json, figures)")
  st.add_argument("--num_bootstrap", type=int, default=200, help="bootstrap resamples per fit")
  st.add_argument("--no_plots", action="store_true", help="skip the PNG figures")
  st.set_defaults(fn=_study)

  t = sub.add_parser("toy_data", help="the toy study's text encoders and records (the demo's data)")
  t.add_argument("--workdir", required=True)
  t.add_argument("--num_train", type=int, default=20_000)
  t.add_argument("--num_val", type=int, default=512)
  t.set_defaults(fn=_toy_data)

  s = sub.add_parser("score", help="held-out sample accuracy of runs (the demo's shapes checker)")
  s.add_argument("dirs", nargs="+", help="run directories or directories holding runs")
  s.add_argument("--text_encoders", required=True, help="the toy data's text_encoders directory")
  s.add_argument("--samples_per_prompt", type=int, default=8)
  s.add_argument(
    "--sampling_steps", type=int, nargs="+", default=[28], help="step counts to score at (the paper: 5 10 25 50)"
  )
  s.add_argument("--cfg_scale", type=float, default=3.0)
  s.set_defaults(fn=_score)
  return p


def main(argv: Sequence[str] | None = None) -> None:
  args = build_parser().parse_args(argv)
  logging.getLogger("matplotlib").setLevel(logging.WARNING)
  try:
    args.fn(args)
  except KeyboardInterrupt:  # (a run stopped inside its training loop raises command.Stopped instead)
    raise command.Stopped(f"interrupted (Ctrl-C): {_INTERRUPTED[args.command]}") from None


def entry_point() -> None:
  """Console entry point (``sd3-scaling``): expected errors end in one line and exit code 2."""
  command.run(main, "sd3-scaling")
