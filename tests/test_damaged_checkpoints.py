"""Resuming from the newest intact checkpoint: the newest one damaged (truncated, unreadable,
its metadata missing, or one bit flipped in uncompressed array data, which only the recorded
checksums can see) is named in one warning, moved aside, and the run goes on from the previous
step with exactly the losses of an uninterrupted run. Also: nothing intact left (exit 2, one
line), the goodput of such a forced restart, and a save on a full disk (one line, no traceback,
the older checkpoint kept).

One uninterrupted reference run (module fixture) serves every case; each case copies it."""

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest

from configs import tiny
from sd3_jax.storage import recovery
from sd3_jax.training import goodput, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Checkpoints at 2, 4, 6 (all kept), uncompressed so that a flipped bit lands in the array bytes.
FLAGS = dict(
  total_steps=6, log_every=1, checkpoint_every=2, keep_checkpoints=5, checkpoint_compression=False, **{"val.every": 0}
)


def _config(**overrides):
  c = tiny.get_config()
  c.update_from_flattened_dict({**FLAGS, **overrides})
  return c


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _losses(workdir):
  return {r["step"]: r["loss"] for r in _records(workdir) if "loss" in r}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  wd = tmp_path_factory.mktemp("reference")
  train.train_and_evaluate(_config(), str(wd))
  assert sorted(os.listdir(wd / "checkpoints")) == ["2", "4", "6"]
  return wd


def _largest_data_file(step_dir):
  files = [
    os.path.join(r, f) for r, _, fs in os.walk(step_dir / "state") for f in fs if os.sep + "d" + os.sep in r + os.sep
  ]
  return max(files, key=os.path.getsize)


def _truncate(step_dir):
  path = _largest_data_file(step_dir)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _unreadable(step_dir):  # the array database's manifest garbled (root ignores permissions)
  (step_dir / "state" / "manifest.ocdbt").write_bytes(bytes(range(256)) * 2)


def _missing_metadata(step_dir):
  os.remove(step_dir / "state" / "_METADATA")


def _flip_one_bit(step_dir):  # silent for orbax: the arrays restore, with one wrong value
  path = _largest_data_file(step_dir)
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0x04
  open(path, "wb").write(bytes(data))


@pytest.mark.parametrize(
  "damage,kind",
  [
    (_truncate, "truncated"),
    (_unreadable, "unreadable"),
    (_missing_metadata, "missing-metadata"),
    (_flip_one_bit, "checksum"),
  ],
)
def test_damaged_newest_checkpoint_resumes_from_the_previous_one_exactly(reference, tmp_path, caplog, damage, kind):
  wd = tmp_path / "run"
  shutil.copytree(reference, wd)
  damage(wd / "checkpoints" / "6")
  with caplog.at_level(logging.INFO):
    train.train_and_evaluate(_config(), str(wd))
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "damaged" in r.getMessage()]
  assert len(warnings) == 1 and "\n" not in warnings[0], warnings
  assert f"checkpoint step 6 is damaged ({kind.replace('-', ' ')})" in warnings[0]
  assert f"moved aside to {wd / 'checkpoints' / f'6.damaged-{kind}'}" in warnings[0]
  assert "trying the previous one, step 4" in warnings[0]
  assert any("resumed from step 4" in r.getMessage() for r in caplog.records)
  # Nothing deleted: the damaged step is kept under its new name, next to the new step 6.
  assert sorted(os.listdir(wd / "checkpoints")) == ["2", "4", "6", f"6.damaged-{kind}"]
  assert _losses(wd) == _losses(reference)  # steps 5 and 6 trained again, bit for bit


def test_forced_restart_goodput_counts_the_redone_steps(reference, tmp_path):
  wd = tmp_path / "run"
  shutil.copytree(reference, wd)
  _missing_metadata(wd / "checkpoints" / "6")
  train.train_and_evaluate(_config(), str(wd))
  s = goodput.summarize(str(wd))
  assert s["attempts"] == 2
  assert s["redone_s"] > 0  # the reference's steps 5 and 6, thrown away by the resume from 4
  assert s["restore_s"] > 0 and s["compile_s"] > 0 and s["checkpoint_s"] > 0 and s["productive_s"] > 0
  assert 0 < s["goodput"] < 1
  parts = sum(s[f"{k}_s"] for k in ("productive",) + goodput.BADPUT)
  assert parts == pytest.approx(s["total_s"])
  last = [r for r in _records(wd) if "goodput/fraction" in r][-1]
  assert last["step"] == 6 and last["goodput/fraction"] == pytest.approx(s["goodput"], abs=0.05)
  p = subprocess.run(
    [sys.executable, "-m", "sd3_jax.main", "--goodput", str(wd)], cwd=REPO, capture_output=True, text=True, timeout=300
  )
  assert p.returncode == 0, p.stderr
  assert p.stdout.startswith("goodput ") and "over 2 attempt(s)" in p.stdout and "redone" in p.stdout


def test_no_intact_checkpoint_left_is_one_line_and_exit_2(reference, tmp_path):
  wd = tmp_path / "run"
  shutil.copytree(reference, wd)
  for step in (2, 4, 6):
    _missing_metadata(wd / "checkpoints" / str(step))
  with pytest.raises(recovery.NoIntactCheckpointError) as e:
    train.train_and_evaluate(_config(), str(wd))
  message = str(e.value)
  assert isinstance(e.value, ValueError)  # sd3-train's one-line exit 2
  assert "\n" not in message and "no intact checkpoint" in message
  for step in (6, 4, 2):
    assert f"step {step} (missing metadata" in message and f"{step}.damaged-missing-metadata" in message
  assert sorted(os.listdir(wd / "checkpoints")) == [f"{s}.damaged-missing-metadata" for s in (2, 4, 6)]


@pytest.mark.skipif(
  os.geteuid() != 0, reason="mounting a small tmpfs needs root; run the suite as root to test a full disk"
)
def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_older_checkpoint(tmp_path):
  mnt = tmp_path / "small"
  mnt.mkdir()
  # One uncompressed tiny checkpoint is 4.6 MB: the first save fits, the second one does not.
  subprocess.run(["mount", "-t", "tmpfs", "-o", "size=7m", "tmpfs", str(mnt)], check=True)
  try:
    wd = mnt / "run"
    cmd = [
      sys.executable, "-m", "sd3_jax.main", "--config", os.path.join(REPO, "configs/tiny.py"), "--workdir", str(wd),
      "--config.total_steps=4", "--config.checkpoint_every=2", "--config.keep_checkpoints=1",
      "--config.log_every=2", "--config.val.every=0", "--config.checkpoint_compression=False",
    ]  # fmt: skip
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout, p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith(("sd3-train: error", "E1"))]
    assert len(errors) == 1, p.stderr  # no error log lines besides it (orbax's are quieted)
    assert errors[0].startswith(f"sd3-train: error: cannot write checkpoint step 4 to {wd / 'checkpoints'}")
    assert "no space left on the device (" in errors[0] and " free)" in errors[0]
    assert "the last intact checkpoint is step 2, kept with everything older" in errors[0]
    assert sorted(n for n in os.listdir(wd / "checkpoints") if n.isdigit()) == ["2"]  # keep-1 deleted nothing
  finally:
    subprocess.run(["umount", str(mnt)], check=False)
