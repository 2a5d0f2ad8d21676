r"""The paper's formulation study (section 5.1, Table 1) on the toy data: one model size and two
training lengths, crossed with the formulations of Table 1 (rectified flow with four timestep
densities, eps- and v-prediction on the LDM-linear and cosine schedules, EDM with Karras'
setting and with the cos and rf weightings). 22 runs of the embedded demo's pixel-space MM-DiT
(d = 2 at width 16 d, batch 16, 400 and 1200 steps); every run logs its own validation loss and
the rf yardstick val/rf_loss (docs/formulations.md). Roughly two hours on an idle 2-core CPU.

  python -m sd3_jax.scaling toy_data --workdir WORKDIR
  python -m sd3_jax.scaling run configs/scaling/formulations.py:WORKDIR/data --sweep_dir WORKDIR/formulations
  python -m sd3_jax.scaling score WORKDIR/formulations --text_encoders WORKDIR/text_encoders \
      --sampling_steps 5 10 25 50
  python -m sd3_jax.scaling analyze WORKDIR/formulations --out WORKDIR/formulations_report --loss val/rf_loss

The analysis ranks the formulations at each length by val/rf_loss and by held-out sample
accuracy at each sampling step count, with the paper's average rank (``formulations`` in
scaling.json, formulations.csv). For a paper-sized study, point base_config at an experiment
config on real data and keep the axis.
"""

from sd3_jax.scaling import toy

TABLE_1 = (
  "rf/lognorm(0.00,1.00)",
  "rf/mode(1.29)",
  "rf/cosmap",
  "rf",
  "eps/linear",
  "v/linear",
  "eps/cos",
  "v/cos",
  "edm(-1.20,1.20)",
  "edm/cos",
  "edm/rf",
)


def get_config(data_dir: str = "workdirs/scaling_demo/data"):
  s = toy.sweep_on_demo_data("formulations", data_dir)
  s.width_per_depth = 16
  s.val_points = 4
  s.grids = [dict(name="formulations", depths=(2,), lengths=(400, 1200), axes={"flow.formulation": TABLE_1})]
  return s
