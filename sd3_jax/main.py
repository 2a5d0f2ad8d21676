r"""Train an MM-DiT with rectified flow (the ``sd3-train`` command).

  sd3-train --config configs/tiny.py --workdir /tmp/sd3_tiny \
      [--config.total_steps=200 --config.global_batch_size=16 ...]
  python -m sd3_jax.main ...   # the same

Restarting the same command resumes from the latest checkpoint in WORKDIR/checkpoints.
WORKDIR may be a URL such as gs://bucket/run (etils.epath).

Exit codes: 0 done; 2 bad config, data or paths (one line on stderr); 3 NaN/Inf loss, gradient
or parameters (the last good checkpoint is kept); 42 preempted: SIGTERM (or, multi-host, jax's
preemption sync point) made the run save a checkpoint of the current step and wait until it was
committed; rerun the same command to resume exactly.

Multi-host: on TPU pods / SLURM pass --multihost (jax.distributed auto-detects the cluster);
elsewhere give --coordinator_address, --num_processes and --process_id.
"""

from __future__ import annotations

import logging
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from sd3_jax import command

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Experiment config file (configs/*.py); override keys with --config.key=value.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics.jsonl and TensorBoard logs.")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() (auto-detected cluster).")
_COORD = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (implies --multihost).")
_NPROC = flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
_PID = flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")

flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  if _COORD.value:
    if _NPROC.value is None or _PID.value is None:
      raise app.UsageError("--coordinator_address needs --num_processes and --process_id")
    jax.distributed.initialize(coordinator_address=_COORD.value, num_processes=_NPROC.value, process_id=_PID.value)
  elif _MULTIHOST.value:
    jax.distributed.initialize()

  # after jax.distributed, which must come before any computation
  from sd3_jax.training import divergence, preemption, train

  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except preemption.Preempted as e:
    logging.warning("%s", e)
    sys.exit(preemption.PREEMPTED_EXIT_CODE)
  except divergence.TrainingDivergedError as e:
    logging.error("%s", e)
    sys.exit(3)
  except command.EXPECTED_ERRORS as e:  # bad config, data or paths: one line, no traceback
    print(f"sd3-train: error: {command.one_line(e)}", file=sys.stderr)
    sys.exit(command.EXIT_USAGE)


def entry_point() -> None:
  """Console entry point (``sd3-train``)."""
  app.run(main, flags_parser=command.parse_absl_flags("sd3-train"))


if __name__ == "__main__":
  entry_point()
