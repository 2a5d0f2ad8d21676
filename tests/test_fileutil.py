"""Atomic directory and JSON writes (used by checkpoints, the converter, the dataset builder and the demo)."""

import json
import os

import pytest

from sd3_jax.storage import fileutil


def _write(d, name, text):
  with open(os.path.join(d, name), "w") as f:
    f.write(text)


def test_atomic_directory_creates_and_replaces(tmp_path):
  dst = tmp_path / "out"
  with fileutil.atomic_directory(str(dst)) as tmp:
    assert not dst.exists()  # nothing visible while it is written
    _write(tmp, "a", "1")
  assert (dst / "a").read_text() == "1"
  with fileutil.atomic_directory(str(dst)) as tmp:
    _write(tmp, "b", "2")
    assert (dst / "a").exists()  # the old directory stays until the new one is complete
  assert sorted(os.listdir(dst)) == ["b"]
  assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary or old copies left


def test_failed_write_keeps_the_old_directory(tmp_path, monkeypatch):
  dst = tmp_path / "out"
  dst.mkdir()
  _write(dst, "good", "keep me")
  with pytest.raises(RuntimeError, match="disk full"):
    with fileutil.atomic_directory(str(dst)) as tmp:
      _write(tmp, "half", "x")
      raise RuntimeError("disk full")
  assert sorted(os.listdir(dst)) == ["good"] and sorted(os.listdir(tmp_path)) == ["out"]
  # Relative paths resolve against the working directory at entry.
  monkeypatch.chdir(tmp_path)
  with fileutil.atomic_directory("rel") as tmp:
    assert os.path.isabs(tmp)
  assert (tmp_path / "rel").is_dir()


def test_atomic_json(tmp_path):
  p = str(tmp_path / "x.json")
  fileutil.atomic_json(p, {"a": [1, 2]})
  fileutil.atomic_json(p, {"b": 3})
  assert json.load(open(p)) == {"b": 3} and os.listdir(tmp_path) == ["x.json"]
