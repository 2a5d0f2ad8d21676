r"""The toy study (``bash launch/scaling_demo.sh WORKDIR --part NAME``): the paper's claims tested on
the embedded demo's coloured shapes, in a regime where sample quality separates runs.

The regime (fixed before any comparison was run; docs/scaling.md says why):

- task: the demo's data and checker unchanged (32x32 pixels, patch 4: 64 image tokens + 24 text
  tokens; 24 held-out prompts, 8 samples each, CFG 3, scored at 5 and 25 sampling steps);
- family: the demo's shape, hidden 32 d, d heads (head dim 32), d = 1..4; d = 4 is the demo's model,
  the only setting known beforehand to reach 10x the checker's chance level (7.8% against 0.65%
  after 1200 steps); smaller models sit nearer chance, so the runs spread;
- training: batch 64, learning rate 3e-3 (the demo's, standard parametrization), warmup-stable-
  decay (50 warm-up steps, 1-sqrt cooldown over the last 20% to 0), EMA 0.995; lengths 400, 800
  and 1200 steps as cooldown branches of one 1200-step run per model.

Parts (each its own sweep directory):

  scaling       d = 1, 2, 3, 4 at 400, 800, 1200 steps (12 runs): claims 1, 4 and 5
  formulations  d = 2, 1200 steps, the 7 formulations of the paper's Table 1 that the study
                names, seeds 0, 1, 2 (21 runs, equal compute): claim 2
  backbones     d = 2, the five backbones at the compute of the MM-DiT's 400, 800 and 1200
                steps (isoFLOP: each backbone gets its own step count; 15 runs as 5 stable runs
                and their cooldown branches): claim 3

  python -m sd3_jax.scaling run configs/scaling/toy_study.py:WORKDIR/data,scaling --sweep_dir WORKDIR/scaling

The argument after ':' is the directory holding the demo's records (``sd3-scaling toy_data``),
then a comma and the part.
"""

from sd3_jax.demo import config as demo_config
from sd3_jax.scaling import toy

PARTS = ("scaling", "formulations", "backbones")
WIDTH_PER_DEPTH = 32
BATCH = 64
LENGTHS = (400, 800, 1200)
FORMULATIONS = ("rf/lognorm(0.00,1.00)", "rf/mode(1.29)", "rf/cosmap", "rf", "eps/linear", "v/cos", "edm(-1.20,1.20)")
SEEDS = (0, 1, 2)
BACKBONES = ("mmdit", "mmdit3", "crossdit", "dit", "uvit")
STUDY_DEPTH = 2  # the formulation and backbone studies' model


def budgets(depth: int = STUDY_DEPTH, lengths=LENGTHS) -> tuple[float, ...]:
  """The MM-DiT's training FLOPs at ``lengths`` steps: the backbones' equal-compute budgets."""
  from sd3_jax.models import mmdit
  from sd3_jax.scaling import family

  base = demo_config.get_config().model.to_dict()
  base.update(depth=depth, hidden_size=WIDTH_PER_DEPTH * depth, num_heads=depth)
  cfg = mmdit.config_from_preset(**base)
  per_step = family.run_compute(
    cfg,
    latent_size=demo_config.IMAGE_SIZE,
    context_len=demo_config.CLIP_TOKENS + demo_config.T5_TOKENS,
    batch_size=BATCH,
    steps=1,
  ).flops_per_step
  return tuple(float(per_step * n) for n in lengths)


def get_config(arg: str = "workdirs/scaling_demo/data,scaling"):
  data_dir, _, part = arg.rpartition(",")
  if part not in PARTS:
    raise ValueError(f"toy_study part {part!r} is not one of {PARTS}: give DATA_DIR,PART, e.g. WORKDIR/data,scaling")
  s = toy.sweep_on_demo_data(
    f"toy_study_{part}",
    data_dir,
    {
      "global_batch_size": BATCH,
      "optimizer.schedule": "wsd",
      "optimizer.decay_fraction": 0.2,
      "optimizer.decay_shape": "1-sqrt",
      "optimizer.end_lr_ratio": 0.0,
      "model.clip_tokens": demo_config.CLIP_TOKENS,  # read by the MM-DiT3 only
    },
  )
  s.width_per_depth = WIDTH_PER_DEPTH
  s.val_points = 4
  s.cooldown_branches = True
  if part == "scaling":
    s.grids = [dict(name="scaling", depths=(1, 2, 3, 4), lengths=LENGTHS)]
  elif part == "formulations":
    s.grids = [
      dict(
        name="formulations",
        depths=(STUDY_DEPTH,),
        lengths=(LENGTHS[-1],),
        axes={"flow.formulation": FORMULATIONS, "seed": SEEDS},
      )
    ]
  else:
    s.grids = [dict(name="backbones", depths=(STUDY_DEPTH,), budgets=budgets(), axes={"model.backbone": BACKBONES})]
  return s
