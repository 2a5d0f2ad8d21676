"""Goodput bookkeeping on a scripted clock: categories, step windows, steps redone after a
restart, the summary across attempts of one workdir, and what a lost peer does (PeerWatch on a
fake key-value store)."""

import json

import pytest

from sd3_jax.training import goodput, peers


class Clock:
  def __init__(self, t=1000.0):
    self.t = t

  def __call__(self):
    return self.t

  def advance(self, seconds):
    self.t += seconds


def _attempt(workdir, clock, *, startup, resume=None, restore=0.0, compile_s, windows, checkpoint_every=None, end):
  """Plays one attempt: start-up, restore, a compiling first step, then windows of (steps, s)."""
  start = clock()
  clock.advance(startup)
  r = goodput.GoodputRecorder(str(workdir), start_time=start, clock=clock)
  if resume is not None:
    with r.phase("restore"):
      clock.advance(restore)
    r.resumed(resume)
  step = resume or 0
  r.switch("compile")
  clock.advance(compile_s)
  r.steps_done(step + 1)
  step += 1
  r.switch("step")
  for n, seconds in windows:
    clock.advance(seconds)
    r.steps_done(step + n)
    step += n
    if checkpoint_every and step % checkpoint_every == 0:
      with r.phase("checkpoint"):
        clock.advance(1.0)
    r.record()
  if end:
    r.record(end)
  return r


def test_killed_run_restart_counts_redone_steps_and_the_gap(tmp_path):
  clock = Clock()
  # Attempt 1: 5 s start-up, 3 s compile (step 1), steps 2..10 in 9 s, a checkpoint at 10
  # (1 s), steps 11..15 in 5 s, then killed (no end record).
  _attempt(tmp_path, clock, startup=5, compile_s=3, windows=[(9, 9.0), (5, 5.0)], checkpoint_every=10, end=None)
  clock.advance(7)  # restart downtime
  # Attempt 2 resumes from step 10: 4 s start-up, 2 s restore, 3 s compile (step 11), steps
  # 12..20 in 9 s, done.
  r = _attempt(tmp_path, clock, startup=4, resume=10, restore=2, compile_s=3, windows=[(9, 9.0)], end="done")
  s = goodput.summarize(str(tmp_path))
  assert s["attempts"] == 2
  assert s["total_s"] == pytest.approx(5 + 3 + 9 + 1 + 5 + 7 + 4 + 2 + 3 + 9)
  assert s["productive_s"] == pytest.approx(9 + 9)  # steps 2..10 of attempt 1, 12..20 of attempt 2
  assert s["redone_s"] == pytest.approx(5)  # steps 11..15 of attempt 1, run again by attempt 2
  assert s["startup_s"] == pytest.approx(9) and s["compile_s"] == pytest.approx(6)
  assert s["restore_s"] == pytest.approx(2) and s["checkpoint_s"] == pytest.approx(1)
  assert s["other_s"] == pytest.approx(7)  # the downtime between the attempts
  assert s["goodput"] == pytest.approx(18 / s["total_s"])
  assert r.summary()["goodput"] == pytest.approx(s["goodput"])
  text = goodput.format_summary(s)
  assert text.splitlines()[0].startswith("goodput 37.5% of 48.0 s wall time over 2 attempt(s)")
  assert "redone" in text and set(goodput.metrics(s)) >= {"goodput/fraction", "goodput/redone_s"}


def test_window_straddling_the_resume_step_is_split_by_steps(tmp_path):
  clock = Clock()
  _attempt(tmp_path, clock, startup=1, compile_s=1, windows=[(10, 10.0)], end=None)  # steps 2..11
  _attempt(tmp_path, clock, startup=1, resume=6, compile_s=1, windows=[(4, 4.0)], end="done")
  s = goodput.summarize(str(tmp_path))
  assert s["redone_s"] == pytest.approx(5.0)  # steps 7..11 of the first window
  assert s["productive_s"] == pytest.approx(5.0 + 4.0)


def test_a_restart_from_scratch_redoes_everything(tmp_path):
  clock = Clock()
  _attempt(tmp_path, clock, startup=1, compile_s=1, windows=[(4, 4.0)], end=None)
  _attempt(tmp_path, clock, startup=1, compile_s=1, windows=[(4, 4.0)], end="done")  # no checkpoint
  assert goodput.summarize(str(tmp_path))["redone_s"] == pytest.approx(4.0)


def test_records_are_small_json_files_and_unknown_categories_fail(tmp_path):
  clock = Clock()
  r = _attempt(tmp_path, clock, startup=1, compile_s=1, windows=[(2, 2.0)], end="preempted at step 3")
  (f,) = list((tmp_path / "goodput").iterdir())
  data = json.loads(f.read_text())
  assert data["end"] == "preempted at step 3" and data["windows"][-1] == [2, 3, 2.0]
  with pytest.raises(ValueError, match="unknown goodput category 'coffee'"):
    r.switch("coffee")
  assert goodput.summarize(str(tmp_path / "nothing")) == {}
  assert "no goodput records" in goodput.format_summary({})


class FakeStore:
  """jax's coordination key-value store, as PeerWatch uses it."""

  def __init__(self):
    self.kv, self.down = {}, False

  def key_value_set(self, key, value, allow_overwrite=False):
    if self.down:
      raise RuntimeError("UNAVAILABLE: Socket closed")
    self.kv[key] = value

  def key_value_dir_get(self, prefix):
    if self.down:
      raise RuntimeError("UNAVAILABLE: Socket closed")
    return [(k, v) for k, v in self.kv.items() if k.startswith(prefix)]


def _watches(n, timeout=10.0):
  store, clock = FakeStore(), Clock()
  watches = [peers.PeerWatch(store, p, n, timeout_s=timeout, interval_s=1.0, clock=clock) for p in range(n)]
  return store, clock, watches


def _rounds(clock, watches, seconds, alive):
  """Every watch in ``alive`` checks once a second; returns the first verdict per process."""
  verdicts = {}
  for _ in range(int(seconds)):
    clock.advance(1.0)
    for p in alive:
      v = watches[p].check()
      if v and p not in verdicts:
        verdicts[p] = (clock() - 1000.0, v)
  return verdicts


def test_peer_watch_names_the_lost_process_within_the_timeout():
  store, clock, w = _watches(3)
  assert _rounds(clock, w, 20, alive=(0, 1, 2)) == {}  # all beating: nothing happens
  verdicts = _rounds(clock, w, 15, alive=(0, 1))  # process 2 stops beating at t=20
  assert set(verdicts) == {0, 1}
  for t, (message, code) in verdicts.values():
    assert 20 + 10 <= t <= 20 + 10 + 1  # timeout + one interval
    assert code == peers.LOST_PEER_EXIT_CODE and message.startswith("lost process 2 of 3 (no heartbeat for 1")


def test_peer_watch_ignores_finished_peers_and_passes_on_fatal_codes():
  store, clock, w = _watches(2)
  _rounds(clock, w, 3, alive=(0, 1))
  w[1].close(0)  # done: the other one is finishing too
  assert _rounds(clock, w, 30, alive=(0,)) == {}
  store2, clock2, w2 = _watches(2)
  _rounds(clock2, w2, 3, alive=(0, 1))
  w2[1].close(3)  # diverged on its own: stop the others too, with the same code
  ((t, (message, code)),) = _rounds(clock2, w2, 30, alive=(0,)).values()
  assert code == 3 and "process 1 of 2 stopped with exit code 3" in message and t <= 3 + 11


def test_peer_watch_when_the_coordination_service_is_gone():
  store, clock, w = _watches(2)
  _rounds(clock, w, 3, alive=(0, 1))
  store.down = True
  ((t, (message, code)),) = _rounds(clock, w, 15, alive=(1,)).values()
  assert code == peers.LOST_PEER_EXIT_CODE and message.startswith("lost the coordination service on process 0")


def test_runtime_failures_are_told_from_our_own_errors():
  assert peers.is_runtime_failure(ValueError("UNKNOWN: Gloo all-reduce failed: Connection closed by peer"))
  assert not peers.is_runtime_failure(ValueError("config.mesh DCN layout (dcn_data=2, ...) spans 2 slices"))
  assert peers.heartbeat_timeout_s(60) == 120 and peers.heartbeat_timeout_s(10) == 40
