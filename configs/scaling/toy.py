r"""The first toy scaling study on the embedded demo's coloured shapes (2026-11-30; the current one,
``bash launch/scaling_demo.sh``, is ``toy_study.py``: wider, with batch 64, where quality discriminates).

A CPU-sized depth family with the paper's shape rule at a quarter of its width: hidden 16 d,
d heads (head dim 16), d = 1, 2, 3, 4 (15k to 0.59M parameters), patch 4 on 32x32x3 pixels
(64 image tokens + 24 text tokens), batch 16, trained 400, 800 and 1200 steps; and the paper's
timestep-sampler comparison at equal compute: d = 2 at the same lengths with logit-normal(0, 1),
uniform, CosMap and mode(1.29) t. The schedule is warmup-stable-decay (50 warm-up steps, a 1-sqrt
cooldown over the last 20% to 0) with cooldown branches: per model one stable run of 1200 steps,
and the 400- and 800-step runs branched off it at steps 320 and 640, so each costs only its
cooldown (80 and 160 steps). 21 runs, 10,080 training steps instead of 16,800 from scratch (40%
less; ``sweep.json`` and ``analyze`` report it). Every run logs the validation loss 4 times.
Roughly 50 minutes on an idle 2-core CPU, compilation and scoring included (docs/mup_wsd.md
says how that was estimated); `--set` or a copy scales it up.

  python -m sd3_jax.scaling run configs/scaling/toy.py:WORKDIR/data --sweep_dir WORKDIR/sweep
  python -m sd3_jax.scaling run configs/scaling/toy.py:WORKDIR/data --sweep_dir WORKDIR/sweep --print_commands

The argument after ':' is the directory holding the demo's records (train/, val/), written by
``python -m sd3_jax.scaling toy_data --workdir WORKDIR``.
"""

from sd3_jax.scaling import toy


def get_config(data_dir: str = "workdirs/scaling_demo/data"):
  s = toy.sweep_on_demo_data(
    "toy",
    data_dir,
    {
      "optimizer.schedule": "wsd",
      "optimizer.decay_fraction": 0.2,
      "optimizer.decay_shape": "1-sqrt",
      "optimizer.end_lr_ratio": 0.0,
    },
  )
  s.width_per_depth = 16
  s.val_points = 4
  s.cooldown_branches = True
  s.grids = [
    dict(name="scaling", depths=(1, 2, 3, 4), lengths=(400, 800, 1200)),
    dict(
      name="samplers",
      depths=(2,),
      lengths=(400, 800, 1200),
      axes={"flow.formulation": ("rf/lognorm(0.00,1.00)", "rf", "rf/cosmap", "rf/mode(1.29)")},
    ),
  ]
  return s
