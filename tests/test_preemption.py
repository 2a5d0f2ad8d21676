"""Stopping on request with the real ``sd3_jax.main``: Ctrl-C (SIGINT) and SIGTERM each save a
checkpoint of the current step (exit 130 and 42) and the rerun resumes exactly; a second Ctrl-C
stops at once; with two processes, both save the same step. Errors in the loop wait for the
in-flight async save."""

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
# step make every logged loss comparable with the uninterrupted run's. 30 steps: room for a
# signal to arrive while a resumed run (a few ms per step) is still training.
COMMON = [
  "--config.total_steps=30",
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


def _stop_at(workdir, step, signum):
  """Starts (or resumes) the run, sends ``signum`` once it logged ``step``; (exit code, output)."""
  p = subprocess.Popen(_cmd(workdir, *COMMON), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  _wait_for_step([p], workdir, step)
  p.send_signal(signum)
  out, _ = p.communicate(timeout=600)
  return p.returncode, out


def test_ctrl_c_and_sigterm_save_the_current_step_and_the_reruns_resume_exactly(tmp_path):
  """One run stopped twice: Ctrl-C (exit 130), then, resumed, SIGTERM (exit 42); each keeps the
  step it reached, says so in one line, and the final rerun logs the losses of an uninterrupted run."""
  full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
  p = subprocess.run(_cmd(full, *COMMON), cwd=REPO, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stdout + p.stderr
  saved = []
  for signum, code, said in (
    (signal.SIGINT, 130, "sd3-train: stopped by Ctrl-C: saved and committed the checkpoint of step"),
    (
      signal.SIGTERM,
      preemption.PREEMPTED_EXIT_CODE,
      "sd3-train: preempted: saved and committed the checkpoint of step",
    ),
  ):
    rc, out = _stop_at(cut, saved[-1] + 2 if saved else 3, signum)
    assert rc == code, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    steps = ckpt_lib.committed_steps(os.path.join(cut, "checkpoints"))
    # No periodic checkpoint before step 100: the only new one is this stop's, at the step the
    # loop had reached when the signal arrived (the last one it logged).
    assert steps == saved + [max(_losses(cut))] and steps[-1] < 30, (steps, out[-3000:])
    if saved:
      assert f"resuming from step {saved[-1]} (" in out
    saved = steps
    assert f"{said} {saved[-1]}; rerun the same command to resume\n" in out, out[-3000:]
  assert "Ctrl-C" not in out, out[-3000:]  # the SIGTERM run says nothing of Ctrl-C
  p = subprocess.run(_cmd(cut, *COMMON), cwd=REPO, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stdout + p.stderr
  assert f"resuming from step {saved[-1]} (" in p.stdout
  a, b = _losses(full), _losses(cut)
  assert sorted(a) == sorted(b) == list(range(1, 31))
  assert a == b  # every logged loss equal to the uninterrupted run's


def test_ctrl_c_is_one_save_and_a_second_ctrl_c_stops_at_once(monkeypatch, capfd):
  """The watcher's handlers in this process: the first Ctrl-C marks the stop and says what
  happens; the second ends the process at once with 130 and says the save is abandoned. With
  several processes the first is passed to jax's preemption sync as a SIGTERM to this process."""
  exits = []

  class Exited(Exception):
    pass

  def fake_exit(code):
    exits.append(code)
    raise Exited

  monkeypatch.setattr(preemption.os, "_exit", fake_exit)
  before = signal.getsignal(signal.SIGINT)
  with preemption.PreemptionWatcher(lambda step: False, multi_process=False) as w:
    assert not w.should_stop(1)
    os.kill(os.getpid(), signal.SIGINT)
    assert w.interrupted and w.should_stop(2)
    assert isinstance(w.stopped(2), preemption.Interrupted) and w.stopped(2).exit_code == 130
    assert "Ctrl-C: saving the checkpoint of the current step" in capfd.readouterr().err
    with pytest.raises(Exited):
      os.kill(os.getpid(), signal.SIGINT)
    assert exits == [130]
    assert "second Ctrl-C: stopping at once without waiting for the save" in capfd.readouterr().err
  assert signal.getsignal(signal.SIGINT) is before  # put back on close
  assert isinstance(preemption.PreemptionWatcher(lambda s: False, multi_process=False).stopped(3), preemption.Preempted)

  terms = []  # stands in for jax's preemption notifier, which owns SIGTERM with several processes
  previous_term = signal.signal(signal.SIGTERM, lambda *a: terms.append(1))
  try:
    with preemption.PreemptionWatcher(lambda step: bool(terms), multi_process=True) as w:
      assert not w.should_stop(1)
      os.kill(os.getpid(), signal.SIGINT)
      assert terms == [1] and w.should_stop(2) and w.stopped(2).exit_code == 130
  finally:
    signal.signal(signal.SIGTERM, previous_term)


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


def test_grain_workers_leave_ctrl_c_to_the_trainer(monkeypatch):
  """A terminal's Ctrl-C reaches the whole process group: grain's worker processes ignore it (the
  trainer saves and shuts them down) instead of dying with a traceback mid-save."""
  import grain

  from sd3_jax.data import input_pipeline, sources

  seen = []
  monkeypatch.setattr(grain.IterDataset, "mp_prefetch", lambda self, options, **kw: seen.append(kw) or self)
  source = sources.SyntheticSource(8, (4, 4, 4), 2, 8, 8, seed=0)
  input_pipeline.make_train_iterator(
    source, global_batch_size=4, seed=0, process_index=0, process_count=1, worker_count=2
  )
  assert seen == [{"worker_init_fn": input_pipeline.ignore_ctrl_c}]
  before = signal.getsignal(signal.SIGINT)
  try:
    input_pipeline.ignore_ctrl_c(0, 2)
    assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
  finally:
    signal.signal(signal.SIGINT, before)


def test_a_ctrl_c_after_the_last_steps_check_stops_once_that_step_is_saved(tmp_path, monkeypatch):
  """Ctrl-C during the last step's validation or sampling (after the loop asked for the last
  time): the run is complete and its final checkpoint committed, and the caller (sd3-demo would
  go on to sample) still stops, with the Ctrl-C code."""
  from configs import tiny
  from sd3_jax.training import train

  def should_stop(self, step):
    self.interrupted = self.interrupted or step == 2  # as if Ctrl-C came right after this check
    return False

  monkeypatch.setattr(preemption.PreemptionWatcher, "should_stop", should_stop)
  c = tiny.get_config()
  c.total_steps, c.log_every, c.checkpoint_every = 2, 1, 100
  c.val.every = 0
  with pytest.raises(preemption.Interrupted, match="checkpoint of step 2;") as e:
    train.train_and_evaluate(c, str(tmp_path))
  assert e.value.exit_code == 130 and ckpt_lib.committed_steps(str(tmp_path / "checkpoints")) == [2]
