r"""Train an MM-DiT with rectified flow (the ``sd3-train`` command).

  sd3-train --config configs/tiny.py --workdir /tmp/sd3_tiny \
      [--config.total_steps=200 --config.global_batch_size=16 ...]
  python -m sd3_jax.main ...   # the same

Restarting the same command resumes from the newest intact checkpoint in WORKDIR/checkpoints
(a damaged one is moved aside). WORKDIR may be a URL such as gs://bucket/run (etils.epath).

Exit codes: 0 done; 2 bad config, data, paths or storage (one line on stderr: also a full
disk, or no intact checkpoint); 3 NaN/Inf loss, gradient or parameters (the last good
checkpoint is kept); 42 preempted: SIGTERM (or, multi-host, jax's preemption sync point) made
the run save a checkpoint of the current step and wait until it was committed; 75 another
process of the run was lost; 130 stopped by Ctrl-C (SIGINT): the same save of the current
step, then stop. A second Ctrl-C stops at once without the save (the latest committed
checkpoint is kept), also with 130. Launchers restart on anything but 0, 2, 3 and 130, a
user's stop (docs/multislice.md). The rerun prints "resuming from step N".

Multi-host: on TPU pods / SLURM pass --multihost (jax.distributed auto-detects the cluster);
elsewhere give --coordinator_address, --num_processes and --process_id. When a process dies,
the others stop within 1.3 x --peer_timeout_s with exit 75.

  sd3-train --goodput WORKDIR   # goodput and where the rest of the time went, over all restarts
"""

from __future__ import annotations

import logging
import os
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
_PEER_TIMEOUT = flags.DEFINE_float(
  "peer_timeout_s", 60.0, "Multi-process: stop (exit 75) when another process has sent no heartbeat for this long."
)
_GOODPUT = flags.DEFINE_string("goodput", None, "Print the goodput summary of this workdir's runs and exit.")


def _quiet_closed_loop_callbacks() -> None:
  """After a failed checkpoint write, tensorstore completes the other writes' futures and calls
  back into orbax's event loop, which closed with the first error; each callback ends in an
  unraisable 'RuntimeError: Event loop is closed' traceback (tens of them under load). The
  failure itself is reported in one line (storage.recovery); these echoes are dropped."""
  default = sys.unraisablehook

  def hook(u):
    last = u.exc_traceback
    while last is not None and last.tb_next is not None:
      last = last.tb_next
    echo = (
      isinstance(u.exc_value, RuntimeError)
      and str(u.exc_value) == "Event loop is closed"
      and last is not None
      and last.tb_frame.f_code.co_filename.endswith(os.path.join("asyncio", "base_events.py"))
    )
    if not echo:
      default(u)

  sys.unraisablehook = hook


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from sd3_jax.training import goodput, peers

  if _GOODPUT.value:
    print(goodput.format_summary(goodput.summarize(_GOODPUT.value)))
    return
  if _CONFIG.value is None or _WORKDIR.value is None:
    raise app.UsageError("--config and --workdir are required (or --goodput WORKDIR)")
  started_at = goodput.process_start_time()
  _quiet_closed_loop_callbacks()
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  heartbeat = dict(heartbeat_timeout_seconds=peers.heartbeat_timeout_s(_PEER_TIMEOUT.value))
  if _COORD.value:
    if _NPROC.value is None or _PID.value is None:
      raise app.UsageError("--coordinator_address needs --num_processes and --process_id")
    jax.distributed.initialize(
      coordinator_address=_COORD.value, num_processes=_NPROC.value, process_id=_PID.value, **heartbeat
    )
  elif _MULTIHOST.value:
    jax.distributed.initialize(**heartbeat)
  watch = None
  if jax.process_count() > 1 and peers.coordination_client() is not None:
    watch = peers.PeerWatch(
      peers.coordination_client(), jax.process_index(), jax.process_count(), timeout_s=_PEER_TIMEOUT.value
    ).start()

  # after jax.distributed, which must come before any computation
  from sd3_jax.storage import recovery
  from sd3_jax.training import divergence, preemption, train

  code = 0
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value, started_at=started_at)
  except BaseException as e:
    if watch is not None and peers.is_runtime_failure(e) and watch.wait_for_verdict():
      watch.wait_for_exit()  # a peer died: the watch ends this process with its one line
    if isinstance(e, preemption.Preempted):  # SIGTERM (42) or Ctrl-C (130): the current step is committed
      print(f"sd3-train: {e}", file=sys.stderr)
      code = e.exit_code
    elif isinstance(e, KeyboardInterrupt):  # Ctrl-C before the training loop started
      print(
        "sd3-train: interrupted (Ctrl-C): before the first step, nothing was written to the checkpoints; "
        "rerun the same command to start (or resume from the latest checkpoint)",
        file=sys.stderr,
      )
      code = command.EXIT_INTERRUPTED
    elif isinstance(e, divergence.TrainingDivergedError):
      logging.error("%s", e)
      code = 3
    elif isinstance(e, recovery.CheckpointWriteError) or (
      isinstance(e, command.EXPECTED_ERRORS) and not peers.is_runtime_failure(e)
    ):  # bad config, data, paths or storage: one line, no traceback
      print(f"sd3-train: error: {command.one_line(e)}", file=sys.stderr)
      code = command.EXIT_USAGE
    else:
      code = 1
      raise
  finally:
    if watch is not None:
      watch.close(code)
  if code:
    sys.exit(code)


def entry_point() -> None:
  """Console entry point (``sd3-train``)."""
  app.run(main, flags_parser=command.parse_absl_flags("sd3-train"))


if __name__ == "__main__":
  entry_point()
