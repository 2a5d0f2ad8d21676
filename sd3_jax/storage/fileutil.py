"""Atomic writes (a reader, or a crash, never sees a half-written file or directory) and the one
way our stores name a location (``as_epath``: local paths made absolute, URLs kept)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Iterator

from etils import epath


def as_epath(path) -> epath.Path:
  """A local path made absolute (orbax takes absolute paths only) or a URL such as gs://b/run."""
  path = os.fspath(path)
  return epath.Path(path if "://" in path else os.path.abspath(path))


@contextlib.contextmanager
def atomic_directory(path: str) -> Iterator[str]:
  """Yields a temporary sibling directory to fill; on success it replaces ``path``.

  On an exception the temporary directory is removed and ``path`` is left as it was. An existing
  ``path`` is first renamed aside and removed only once the new one is in place, so a crash at
  any point leaves either the old or the new directory (or the old one under ``<path>.old-PID``).
  """
  path = os.path.abspath(os.fspath(path))
  tmp = f"{path}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  old = None
  if os.path.lexists(path):
    old = f"{path}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(path, old)
  os.replace(tmp, path)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


def atomic_json(path: str, obj, indent: int = 1) -> None:
  """Writes ``obj`` as JSON to a temporary sibling, then renames it over ``path``."""
  atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def atomic_write_text(path: str, text: str) -> None:
  """Writes ``text`` to a temporary sibling, then renames it over ``path``."""
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)
