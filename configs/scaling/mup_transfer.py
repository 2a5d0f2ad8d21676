r"""Learning-rate transfer across width, SP against muP, on the embedded demo's coloured shapes
(``bash launch/mup_transfer_demo.sh``; Zheng et al. 2025, "Scaling Diffusion Transformers
Efficiently via muP", plot the same for DiT).

A d = 2 MM-DiT (2 heads) at widths 32, 64 and 128 (width_per_depth 16, 32, 64: the head
dimension grows with the width), each trained 600 steps (warmup-stable-decay, 50 warm-up steps)
at learning rates 2^-12 .. 2^-5 under the standard parametrization and under muP with base
width 32: 48 runs. ``analyze`` reports, for each parametrization, the final validation loss per
(width, learning rate), the best learning rate per width and how many grid steps it moves
(scaling.json "transfer", transfer_learning_rate.png). muP's claim: at most one.

  python -m sd3_jax.scaling run configs/scaling/mup_transfer.py:WORKDIR/data --sweep_dir WORKDIR/transfer
  python -m sd3_jax.scaling analyze WORKDIR/transfer --out WORKDIR/transfer_analysis

Measured on this project's 2-core CPU (no accelerator), 2026-12-04: 0.019, 0.025 and 0.062 s per
step at widths 32, 64 and 128; 27 minutes in all, compilation included. The results and what
they say about muP are in docs/mup_wsd.md. The argument after ':' is the directory of
the demo's records, written by ``python -m sd3_jax.scaling toy_data --workdir WORKDIR``.
"""

from sd3_jax.scaling import toy

LEARNING_RATES = tuple(2.0**e for e in range(-12, -4))  # 2^-12 .. 2^-5


def get_config(data_dir: str = "workdirs/scaling_demo/data"):
  s = toy.sweep_on_demo_data(
    "mup_transfer",
    data_dir,
    {
      "optimizer.schedule": "wsd",
      "optimizer.end_lr_ratio": 0.0,
      "model.mup_base_width": 32,  # the narrowest width (d = 2 x 16): there muP is SP
    },
  )
  s.width_per_depth = 16
  s.val_points = 2
  s.grids = [
    dict(
      name="transfer",
      depths=(2,),
      widths=(16, 32, 64),
      lengths=(600,),
      axes={"optimizer.learning_rate": LEARNING_RATES, "model.parametrization": ("sp", "mup")},
    )
  ]
  return s
