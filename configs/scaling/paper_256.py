r"""The paper's scaling family at 256^2 on a pod: d = 15, 18, 21, 24, 30, 38 (hidden 64 d, d heads;
0.50B to 8.06B parameters), batch 4096, as an isoFLOP sweep over four compute budgets, 8
validation points per run. Print one trainer command per run for a pod scheduler or a SLURM
array, and analyse the workdirs wherever they are written:

  python -m sd3_jax.scaling run configs/scaling/paper_256.py:/data/sd3_records \
      --sweep_dir gs://BUCKET/scaling --print_commands
  python -m sd3_jax.scaling analyze /mnt/scaling --out scaling_report --holdout largest

The argument after ':' is a directory with train/ and val/ latent records (docs/training.md). Each budget gives every depth the step count closest to it from its exact FLOPs per step
(``sd3_jax.models.flops.train_step_flops``); ``sweep.json`` (written by ``run``) lists them. The
budgets (1e20 to 1e21 FLOPs) span what Liang et al. 2024 extrapolated to; raise them for the
d=38 end to see its optimum. The base config is configs/sd3_medium.py (lr 1e-4, 1000 warm-up
steps, bf16, full remat); add --config.multihost flags to the printed lines as the pod needs.
"""

import os

from sd3_jax.scaling.sweep import dotted, sweep_config


def get_config(data_dir: str = "/data/sd3_records"):
  s = sweep_config()
  s.name = "paper_256"
  s.base_config = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "sd3_medium.py")
  s.base_overrides = dotted(
    {
      "data.source": "records",
      "data.path": os.path.join(data_dir, "train"),
      "data.val_path": os.path.join(data_dir, "val"),
      "val.num_examples": 4096,
      "val.batch_size": 512,
      "log_every": 100,
      "keep_checkpoints": 2,
    }
  )
  s.width_per_depth = 64
  s.val_points = 8
  s.grids = [dict(name="isoflop", depths=(15, 18, 21, 24, 30, 38), budgets=(1e20, 2e20, 5e20, 1e21))]
  return s
