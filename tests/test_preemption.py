"""Preemption with the real ``sd3_jax.main``: SIGTERM -> a checkpoint of the current step, exit
42, and the rerun resumes exactly; with two processes, both save the same step. Errors in the
loop wait for the in-flight async save."""

import json
import os
import signal
import subprocess
import sys
import time

import portpicker
import pytest

from sd3_jax.storage import checkpoint as ckpt_lib
from sd3_jax.training import preemption

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# log_every=1: a resumed run's first logged window starts at the resume step, so windows of one
# step make every logged loss comparable with the uninterrupted run's.
COMMON = [
  "--config.total_steps=12",
  "--config.log_every=1",
  "--config.checkpoint_every=100",
  "--config.val.every=0",
  "--config.mesh.fsdp=4",
  "--config.mesh.data=2",
]


def _cmd(workdir, *flags):
  return [
    sys.executable,
    "-m",
    "sd3_jax.main",
    "--config",
    os.path.join(REPO, "configs/tiny.py"),
    "--workdir",
    workdir,
    *flags,
  ]


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def _logged_steps(workdir):
  try:
    return _losses(workdir)
  except (FileNotFoundError, json.JSONDecodeError):
    return {}


def _wait_for_step(procs, workdir, step, timeout=600):
  deadline = time.time() + timeout
  while time.time() < deadline and all(p.poll() is None for p in procs):
    if _logged_steps(workdir) and max(_logged_steps(workdir)) >= step:
      return
    time.sleep(0.05)
  outs = []
  for p in procs:
    if p.poll() is None:
      p.kill()
    outs.append(p.communicate()[0][-3000:])
  raise AssertionError(f"the run did not reach step {step}:\n" + "\n---\n".join(outs))


def test_sigterm_saves_current_step_exits_42_and_resumes_exactly(tmp_path):
  full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
  p = subprocess.run(_cmd(full, *COMMON), cwd=REPO, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stdout + p.stderr
  p = subprocess.Popen(_cmd(cut, *COMMON), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  _wait_for_step([p], cut, 3)
  p.send_signal(signal.SIGTERM)
  out, _ = p.communicate(timeout=600)
  assert p.returncode == preemption.PREEMPTED_EXIT_CODE, out
  saved = ckpt_lib.committed_steps(os.path.join(cut, "checkpoints"))
  # No periodic checkpoint before step 100: the only one is the preemption's, at the step
  # the loop had reached when the signal arrived (the last one it logged).
  assert len(saved) == 1 and saved[0] == max(_losses(cut)) and 3 <= saved[0] < 12, (saved, out)
  assert f"saved and committed the checkpoint of step {saved[0]}" in out
  p = subprocess.run(_cmd(cut, *COMMON), cwd=REPO, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stdout + p.stderr
  assert f"resumed from step {saved[0]}" in p.stdout + p.stderr
  a, b = _losses(full), _losses(cut)
  assert sorted(a) == sorted(b) == list(range(1, 13))
  assert a == b  # every logged loss equal to the uninterrupted run's


def test_two_processes_agree_on_the_preemption_step(tmp_path):
  """SIGTERM to process 1 only: jax's preemption sync point makes both save the same step."""
  wd, port = str(tmp_path / "mp"), portpicker.pick_unused_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
  flags = [
    "--config.total_steps=40",
    "--config.log_every=1",
    "--config.checkpoint_every=100",
    "--config.val.every=0",
    "--config.mesh.fsdp=2",
    "--config.mesh.data=2",
  ]
  procs = [
    subprocess.Popen(
      _cmd(wd, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}", *flags),
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  try:
    _wait_for_step(procs, wd, 3)
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=600)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, out in zip(procs, outs):
    assert p.returncode == preemption.PREEMPTED_EXIT_CODE, out
  saved = ckpt_lib.committed_steps(os.path.join(wd, "checkpoints"))
  assert len(saved) == 1 and 3 <= saved[0] < 40, saved
  for out in outs:
    assert f"saved and committed the checkpoint of step {saved[0]}" in out
  # Both processes wrote their part: each one's data-iterator position is in the checkpoint.
  data = os.listdir(os.path.join(wd, "checkpoints", str(saved[0]), "data"))
  assert sorted(f for f in data if f.startswith("process_")) == ["process_0-of-2.json", "process_1-of-2.json"]


def test_an_error_in_the_loop_waits_for_the_in_flight_save(tmp_path, monkeypatch):
  """A NaN stop right after an async save was started still leaves that save committed. The
  config item's write is slowed down by 3 s, so without the wait the error would surface first."""
  import asyncio

  import orbax.checkpoint as ocp
  from configs import tiny
  from sd3_jax.training import divergence, train

  json_write = ocp.JsonCheckpointHandler._save_fn

  async def slow_json_write(self, x, directory):
    await asyncio.sleep(3)
    await json_write(self, x, directory)

  monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", slow_json_write)
  c = tiny.get_config()
  c.total_steps, c.log_every, c.checkpoint_every = 4, 1, 2
  c.val.every = 0
  real_save = ckpt_lib.Checkpointer.save

  def save_then_fail(self, step, *a, **k):
    real_save(self, step, *a, **k)
    raise divergence.TrainingDivergedError(f"stop right after starting the save of step {step}")

  monkeypatch.setattr(ckpt_lib.Checkpointer, "save", save_then_fail)
  with pytest.raises(divergence.TrainingDivergedError, match="step 2"):
    train.train_and_evaluate(c, str(tmp_path))
  assert ckpt_lib.committed_steps(str(tmp_path / "checkpoints")) == [2]
