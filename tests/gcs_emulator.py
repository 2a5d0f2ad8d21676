"""A stand-in Google Cloud Storage for tests: one local directory seen two ways.

- ``FakeGCSFileSystem``: an fsspec file system registered for gs:// (what etils.epath and
  TensorBoard use) that keeps gs://bucket/key at <root>/bucket/key and, like GCS, refuses to append.
- ``Server``: a small HTTP server speaking the subset of the GCS JSON API that tensorstore's gcs
  kvstore driver and google-cloud-storage's bucket query use (media download with generation
  preconditions and byte ranges, media upload, object and bucket metadata, delete, list), serving
  the same directory. Pointing tensorstore (TENSORSTORE_GCS_HTTP_URL) and google-cloud-storage
  (STORAGE_EMULATOR_HOST) at it sends orbax's array writes and bucket queries there, so a training
  run on a gs:// workdir goes through the same code paths as on GCS, with no network and no
  credentials.

Object generations (what the driver's conditional reads and writes compare) come from a counter
per server write, since file mtimes are too coarse to tell quick rewrites apart.
"""

from __future__ import annotations

import contextlib
import glob as _glob
import http.server
import json
import os
import sys
import threading
import time
import urllib.parse

import fsspec
from fsspec.implementations.local import LocalFileSystem

_ROOT = {"dir": None}


class FakeGCSFileSystem(LocalFileSystem):
  """gs://bucket/key -> <root>/bucket/key; no append mode, as on an object store."""

  protocol = ("gs", "gcs")
  cachable = False

  def __init__(self, *args, **kwargs):
    super().__init__(auto_mkdir=True)

  @classmethod
  def _strip_protocol(cls, path):
    path = fsspec.utils.stringify_path(path)
    for prefix in ("gs://", "gcs://"):
      if path.startswith(prefix):
        return os.path.join(_ROOT["dir"], path[len(prefix) :]).rstrip("/")
    return super()._strip_protocol(path)

  def glob(self, path, **kwargs):
    """Matches come back as gcsfs gives them, "bucket/key" (epath adds gs:// again), not as
    local paths."""
    root = _ROOT["dir"].rstrip("/") + "/"
    return sorted(p[len(root) :] for p in _glob.glob(self._strip_protocol(path)))

  def _open(self, path, mode="rb", **kwargs):
    if "a" in mode:
      raise OSError(f"object stores cannot append ({path}, mode {mode!r})")
    return super()._open(path, mode, **kwargs)


_GENERATIONS: dict[str, tuple[int, int]] = {}  # path -> (generation, mtime_ns when it was set)
_COUNTER = [0]


def _generation(path: str) -> int:
  """The generation the server gave its last write of path; a file written by other means (the
  fsspec side) gets its mtime, which the next server write replaces."""
  mtime = os.stat(path).st_mtime_ns
  gen, seen = _GENERATIONS.get(path, (None, None))
  return gen if seen == mtime else mtime


def _new_generation(path: str) -> None:
  _COUNTER[0] = max(_COUNTER[0] + 1, time.time_ns())
  _GENERATIONS[path] = (_COUNTER[0], os.stat(path).st_mtime_ns)


class _Handler(http.server.BaseHTTPRequestHandler):
  protocol_version = "HTTP/1.1"
  root = ""
  lock = threading.Lock()

  def log_message(self, *args):  # quiet
    pass

  # -- helpers
  def _parse(self):
    u = urllib.parse.urlsplit(self.path)
    return u.path, {k: v[-1] for k, v in urllib.parse.parse_qs(u.query, keep_blank_values=True).items()}

  def _send(self, code, body=b"", content_type="application/json", headers=()):
    self.send_response(code)
    self.send_header("Content-Type", content_type)
    self.send_header("Content-Length", str(len(body)))
    for k, v in headers:
      self.send_header(k, v)
    self.end_headers()
    if body and self.command != "HEAD":
      self.wfile.write(body)

  def _error(self, code, message):
    self._send(code, json.dumps({"error": {"code": code, "message": message}}).encode())

  def _file(self, bucket, name):
    return os.path.join(self.root, bucket, name)

  def _meta(self, bucket, name, path):
    st = os.stat(path)
    return {
      "kind": "storage#object",
      "bucket": bucket,
      "name": name,
      "size": str(st.st_size),
      "generation": str(_generation(path)),
      "metageneration": "1",
      "updated": "2026-01-01T00:00:00.000Z",
    }

  def _precondition_fails(self, q, path):
    gen = _generation(path) if os.path.isfile(path) else 0
    if "ifGenerationMatch" in q and int(q["ifGenerationMatch"]) != gen:
      return 412
    if "ifGenerationNotMatch" in q and int(q["ifGenerationNotMatch"]) == gen:
      return 304
    return None

  def _object_path(self, path):
    # /storage/v1/b/{bucket}/o/{object}
    parts = path.split("/", 6)
    if len(parts) == 7 and parts[1:4] == ["storage", "v1", "b"] and parts[5] == "o":
      return parts[4], urllib.parse.unquote(parts[6])
    return None, None

  # -- verbs
  def do_GET(self):  # noqa: N802
    path, q = self._parse()
    bucket, name = self._object_path(path)
    if bucket is not None:
      return self._get_object(bucket, name, q)
    parts = path.split("/")
    if len(parts) == 6 and parts[1:4] == ["storage", "v1", "b"] and parts[5] == "o":
      return self._list(parts[4], q)
    if len(parts) == 5 and parts[1:4] == ["storage", "v1", "b"]:  # bucket metadata (orbax asks)
      return self._send(
        200,
        json.dumps(
          {"kind": "storage#bucket", "name": parts[4], "id": parts[4], "hierarchicalNamespace": {"enabled": False}}
        ).encode(),
      )
    self._error(400, f"unsupported GET {self.path}")

  def _existing(self, bucket, name, q):
    """The object's file; None after answering 404 or a failed precondition (304 or 412)."""
    f = self._file(bucket, name)
    if not os.path.isfile(f):
      return self._error(404, f"No such object: {bucket}/{name}")
    code = self._precondition_fails(q, f)
    if code:
      return self._send(code) if code == 304 else self._error(code, "precondition failed")
    return f

  def _get_object(self, bucket, name, q):
    with self.lock:
      f = self._existing(bucket, name, q)
      if f is None:
        return
      meta = self._meta(bucket, name, f)
      if q.get("alt") != "media":
        return self._send(200, json.dumps(meta).encode())
      with open(f, "rb") as fh:
        data = fh.read()
    headers = [("x-goog-generation", meta["generation"]), ("x-goog-metageneration", "1")]
    rng = self.headers.get("Range")
    if rng and rng.startswith("bytes="):
      lo, _, hi = rng[len("bytes=") :].partition("-")
      if lo == "":  # suffix range
        lo = max(0, len(data) - int(hi))
        hi = len(data) - 1
      else:
        lo, hi = int(lo), (int(hi) if hi else len(data) - 1)
      if lo >= len(data) and len(data) > 0:
        return self._error(416, "range not satisfiable")
      hi = min(hi, len(data) - 1)
      body = data[lo : hi + 1]
      headers.append(("Content-Range", f"bytes {lo}-{hi}/{len(data)}"))
      return self._send(206, body, "application/octet-stream", headers)
    self._send(200, data, "application/octet-stream", headers)

  def _list(self, bucket, q):
    prefix = q.get("prefix", "")
    start, end = q.get("startOffset", ""), q.get("endOffset", "")
    base = os.path.join(self.root, bucket)
    items = []
    with self.lock:
      for dirpath, _, files in os.walk(base):
        for fn in files:
          name = os.path.relpath(os.path.join(dirpath, fn), base).replace(os.sep, "/")
          if name.startswith(prefix) and name >= start and (not end or name < end):
            items.append(self._meta(bucket, name, os.path.join(dirpath, fn)))
    items.sort(key=lambda m: m["name"])
    self._send(200, json.dumps({"kind": "storage#objects", "items": items}).encode())

  def do_POST(self):  # noqa: N802
    path, q = self._parse()
    parts = path.split("/")
    length = int(self.headers.get("Content-Length") or 0)
    body = self.rfile.read(length) if length else b""
    if not (len(parts) == 7 and parts[1:5] == ["upload", "storage", "v1", "b"] and parts[6] == "o"):
      return self._error(400, f"unsupported POST {self.path}")
    if q.get("uploadType") != "media" or "name" not in q:
      return self._error(400, f"only uploadType=media with a name is supported: {self.path}")
    bucket, name = parts[5], q["name"]
    f = self._file(bucket, name)
    with self.lock:
      code = self._precondition_fails(q, f)
      if code:
        return self._error(412, "precondition failed")
      os.makedirs(os.path.dirname(f), exist_ok=True)
      tmp = f + ".uploading"
      with open(tmp, "wb") as fh:
        fh.write(body)
      os.replace(tmp, f)
      _new_generation(f)
      meta = self._meta(bucket, name, f)
    self._send(200, json.dumps(meta).encode())

  def do_DELETE(self):  # noqa: N802
    path, q = self._parse()
    bucket, name = self._object_path(path)
    if bucket is None:
      return self._error(400, f"unsupported DELETE {self.path}")
    with self.lock:
      f = self._existing(bucket, name, q)
      if f is None:
        return
      os.remove(f)
    self._send(204)


class Server:
  """The HTTP side, on a free localhost port, in a daemon thread."""

  def __init__(self, root: str):
    handler = type("Handler", (_Handler,), {"root": root})
    self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    self._httpd.daemon_threads = True
    self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
    self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
    self._thread.start()

  def close(self):
    self._httpd.shutdown()
    self._httpd.server_close()


@contextlib.contextmanager
def fake_gcs(root: str, monkeypatch):
  """gs:// for epath/fsspec and for tensorstore, both kept under ``root``."""
  from etils.epath import backend as epath_backend

  _ROOT["dir"] = root
  os.makedirs(root, exist_ok=True)
  for name in ("gs", "gcs"):
    monkeypatch.setitem(sys.modules["fsspec.registry"]._registry, name, FakeGCSFileSystem)  # noqa: SLF001
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # noqa: SLF001
  server = Server(root)
  monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", server.url)
  monkeypatch.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "fake-token")
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", server.url)  # google-cloud-storage (orbax's bucket query)
  monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "test-project")
  from orbax.checkpoint._src.path import gcs_utils

  gcs_utils.get_bucket.cache_clear()
  try:
    yield server
  finally:
    server.close()
    epath_backend.fsspec_backend._get_filesystem.cache_clear()  # noqa: SLF001
