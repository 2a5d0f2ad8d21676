r"""The toy scaling study on the embedded demo's coloured shapes (``bash launch/scaling_demo.sh``).

A CPU-sized depth family with the paper's shape rule at a quarter of its width: hidden 16 d,
d heads (head dim 16), d = 1, 2, 3, 4 (15k to 0.59M parameters), patch 4 on 32x32x3 pixels
(64 image tokens + 24 text tokens), batch 16, 400 and 1200 steps each; and the paper's
timestep-sampler comparison at equal compute: d = 2 at both lengths with logit-normal(0, 1),
uniform, CosMap and mode(1.29) t. 14 runs (the sampler grid's logit-normal runs are the family's).
Every run logs the validation loss 4 times (a curve, not a point). About an hour on an idle
2-core CPU; `--set` or a copy scales it up.

  python -m sd3_jax.scaling run configs/scaling/toy.py:WORKDIR/data --sweep_dir WORKDIR/sweep
  python -m sd3_jax.scaling run configs/scaling/toy.py:WORKDIR/data --sweep_dir WORKDIR/sweep --print_commands

The argument after ':' is the directory holding the demo's records (train/, val/), written by
``python -m sd3_jax.scaling toy_data --workdir WORKDIR``.
"""

import os

from sd3_jax.demo import config as demo_config
from sd3_jax.scaling.sweep import dotted, sweep_config


def get_config(data_dir: str = "workdirs/scaling_demo/data"):
  s = sweep_config()
  s.name = "toy"
  s.base_config = os.path.abspath(demo_config.__file__)
  data_dir = os.path.abspath(data_dir)
  s.base_overrides = dotted(
    {
      "data.path": os.path.join(data_dir, "train"),
      "data.val_path": os.path.join(data_dir, "val"),
      "global_batch_size": 16,
      "log_every": 50,
      "keep_checkpoints": 1,
      "val.num_examples": 128,
      "val.batch_size": 64,
    }
  )
  s.width_per_depth = 16
  s.val_points = 4
  s.grids = [
    dict(name="scaling", depths=(1, 2, 3, 4), lengths=(400, 1200)),
    dict(
      name="samplers",
      depths=(2,),
      lengths=(400, 1200),
      axes={"flow.formulation": ("rf/lognorm(0.00,1.00)", "rf", "rf/cosmap", "rf/mode(1.29)")},
    ),
  ]
  return s
