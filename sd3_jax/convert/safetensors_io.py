"""Streaming safetensors reading and writing with plain file I/O (no mmap, no torch).

Reading copies one tensor at a time into a fresh numpy buffer (``readinto``), so a process
that converts an 8B checkpoint holds only the tensors it is working on; an mmap would keep
every page it touched resident. Writing lays out the header first (all names, dtypes and
shapes are known before any data is read) and then appends the tensors in order, so
nothing has to be gathered in memory. bfloat16 is numpy's ``ml_dtypes.bfloat16``.

File format (https://github.com/huggingface/safetensors): 8-byte little-endian header size,
a JSON header ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
{str: str}}`` padded with spaces to a multiple of 8, then the raw little-endian data.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np
import safetensors

_DTYPES = {
  "F64": np.dtype(np.float64),
  "F32": np.dtype(np.float32),
  "F16": np.dtype(np.float16),
  "BF16": np.dtype(ml_dtypes.bfloat16),
  "I64": np.dtype(np.int64),
  "I32": np.dtype(np.int32),
  "I16": np.dtype(np.int16),
  "I8": np.dtype(np.int8),
  "U8": np.dtype(np.uint8),
  "BOOL": np.dtype(np.bool_),
  "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
  "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_CODES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit (MAX_HEADER_SIZE)


class HeaderError(ValueError):
  """A malformed safetensors header; the message names the file, the tensor and the problem."""


def _no_duplicates(pairs):
  out = {}
  for k, v in pairs:
    if k in out:
      raise HeaderError(
        f"tensor {k!r}: the name appears twice in the header (a second entry would silently replace the first)"
      )
    out[k] = v
  return out


def read_header(path: str) -> tuple[object, int]:
  """(parsed JSON header, offset of the data section). The 8-byte length is checked against the
  file size and a bound before the header is read; duplicate names are refused while parsing."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise HeaderError(f"{path} is not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", raw)
    if n > _MAX_HEADER or 8 + n > size:
      raise HeaderError(
        f"{path} is not a safetensors file or is truncated: its header claims "
        f"{n} bytes, the file has {size - 8} after the length field (limit {_MAX_HEADER})"
      )
    text = f.read(n)
  try:
    return json.loads(text.decode("utf-8"), object_pairs_hook=_no_duplicates), 8 + n
  except HeaderError as e:
    raise HeaderError(f"{path}: {e}") from None
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise HeaderError(f"{path} is not a safetensors file: the header is not JSON ({e})") from None


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def validate_header(
  path: str, header, data_size: int
) -> tuple[dict[str, str], dict[str, tuple[np.dtype, tuple[int, ...], int, int]]]:
  """Checks a parsed header as the safetensors format defines it and returns (metadata,
  {name: (dtype, shape, begin, end)}).

  Every entry is an object with a known dtype, a shape of non-negative ints and two int
  data_offsets inside the data section, whose length is dtype size x prod(shape); the entries
  do not overlap and cover the data section exactly; ``__metadata__`` maps str to str. The
  safetensors library then checks the file as well (``safe_open``), so anything it refuses is
  refused here too; our own checks come first because they name the tensor.
  """

  def bad(name, what):
    return HeaderError(f"{path}: tensor {name!r}: {what}")

  if not isinstance(header, dict):
    raise HeaderError(f"{path} is not a safetensors file: the header is a JSON {type(header).__name__}, not an object")
  metadata = header.get("__metadata__", {})
  if metadata is None:
    metadata = {}
  if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
    raise HeaderError(f"{path}: __metadata__ must map strings to strings, got {str(metadata)[:200]}")
  entries = {}
  for name, e in header.items():
    if name == "__metadata__":
      continue
    if not isinstance(e, dict):
      raise bad(name, f"the entry is a {type(e).__name__}, not an object with dtype, shape and data_offsets")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in e]
    if missing:
      raise bad(name, f"the entry has no {' / '.join(missing)}")
    code, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
    if not isinstance(code, str) or code not in _DTYPES:
      raise bad(name, f"unsupported dtype {code!r} (known: {sorted(_DTYPES)})")
    if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
      raise bad(name, f"shape {shape!r} is not a list of non-negative integers")
    if (
      not isinstance(offsets, list)
      or len(offsets) != 2
      or not all(_is_int(o) for o in offsets)
      or not 0 <= offsets[0] <= offsets[1]
    ):
      raise bad(name, f"data_offsets {offsets!r} are not two integers 0 <= begin <= end")
    begin, end = offsets
    if end > data_size:
      raise bad(
        name,
        f"data_offsets [{begin}, {end}] run past the end of the data section "
        f"({data_size} bytes): the file is truncated or the header lies",
      )
    dt = _DTYPES[code]
    nbytes = math.prod(shape) * dt.itemsize
    if end - begin != nbytes:
      raise bad(name, f"data_offsets [{begin}, {end}] hold {end - begin} bytes, but {code} {shape} needs {nbytes}")
    entries[name] = (dt, tuple(shape), begin, end)
  pos, prev = 0, None
  for name, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
    if begin < pos:
      raise bad(name, f"data_offsets [{begin}, {end}] overlap tensor {prev!r} (which ends at {pos})")
    if begin > pos:
      raise bad(
        name,
        f"data_offsets [{begin}, {end}] leave bytes {pos}..{begin} of the data "
        "section unused (entries must cover it exactly)",
      )
    pos, prev = end, name
  if pos != data_size:
    raise HeaderError(
      f"{path}: the tensors cover {pos} bytes of the {data_size}-byte data section "
      f"(last tensor {prev!r}); the file has trailing data or the header lies"
    )
  try:
    with safetensors.safe_open(path, "numpy"):
      pass
  except Exception as e:  # safetensors_rust.SafetensorError
    raise HeaderError(f"{path}: rejected by the safetensors library: {e}") from None
  return dict(metadata), entries


def dtype_code(dtype) -> str:
  dt = np.dtype(dtype)
  if dt not in _CODES:
    raise ValueError(f"dtype {dt} cannot be stored in safetensors")
  return _CODES[dt]


class SafetensorsReader:
  """Header of one .safetensors file plus on-demand reads of single tensors.

  The header is validated completely on opening (``validate_header``), before anything it
  describes is used: a reader exists only for a file that holds every byte its header promises.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    header, self._data_start = read_header(self.path)
    self.metadata, self._entries = validate_header(self.path, header, os.path.getsize(self.path) - self._data_start)

  def keys(self) -> list[str]:
    return list(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def shape(self, name: str) -> tuple[int, ...]:
    return self._entries[name][1]

  def dtype(self, name: str) -> np.dtype:
    return self._entries[name][0]

  def read(self, name: str) -> np.ndarray:
    dt, shape, begin, end = self._entries[name]
    buf = np.empty(end - begin, np.uint8)
    with open(self.path, "rb", buffering=0) as f:
      f.seek(self._data_start + begin)
      view, got = memoryview(buf), 0
      while got < len(buf):
        n = f.readinto(view[got:])
        if not n:
          raise ValueError(f"{self.path} is truncated (tensor {name!r})")
        got += n
    return buf.view(dt).reshape(shape)


class SafetensorsWriter:
  """Writes a safetensors file whose tensor list is fixed up front, one tensor at a time.

  ``specs`` is an ordered iterable of (name, dtype, shape); tensors must then be passed to
  ``write`` in exactly that order. ``close`` checks that all were written.
  """

  def __init__(
    self,
    path: str | os.PathLike,
    specs: Iterable[tuple[str, object, tuple[int, ...]]],
    metadata: Mapping[str, str] | None = None,
  ):
    self.path = os.fspath(path)
    self._specs = [(name, np.dtype(dt), tuple(int(s) for s in shape)) for name, dt, shape in specs]
    header: dict = {}
    if metadata:
      header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, dt, shape in self._specs:
      if name in header:
        raise ValueError(f"duplicate tensor name {name!r}")
      n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
      header[name] = {"dtype": dtype_code(dt), "shape": list(shape), "data_offsets": [offset, offset + n]}
      offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    self._f = open(self.path, "wb")
    self._f.write(struct.pack("<Q", len(raw)) + raw)
    self._next = 0

  def write(self, name: str, array: np.ndarray) -> None:
    if self._next >= len(self._specs):
      raise ValueError(f"{self.path}: unexpected extra tensor {name!r}")
    want, dt, shape = self._specs[self._next]
    if name != want:
      raise ValueError(f"{self.path}: expected tensor {want!r} next, got {name!r}")
    if array.dtype != dt or tuple(array.shape) != shape:
      raise ValueError(
        f"{self.path}: tensor {name!r} is {array.dtype}{list(array.shape)}, header says {dt}{list(shape)}"
      )
    self._f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
    self._next += 1

  def close(self) -> None:
    if self._f.closed:
      return
    self._f.close()
    if self._next != len(self._specs):
      missing = [s[0] for s in self._specs[self._next :]]
      raise ValueError(f"{self.path}: {len(missing)} tensors were never written, e.g. {missing[:3]}")

  def abort(self) -> None:
    self._f.close()

  def __enter__(self):
    return self

  def __exit__(self, exc_type, *_):
    if exc_type is None:
      self.close()
    else:
      self.abort()


def plan_shards(
  specs: list[tuple[str, object, tuple[int, ...]]], max_shard_bytes: int
) -> list[list[tuple[str, object, tuple[int, ...]]]]:
  """Splits ordered specs into consecutive shards of at most max_shard_bytes each (a tensor
  larger than the limit gets a shard of its own), as huggingface sharding does."""
  shards: list[list] = [[]]
  size = 0
  for spec in specs:
    n = int(np.prod(spec[2], dtype=np.int64)) * np.dtype(spec[1]).itemsize
    if shards[-1] and size + n > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(spec)
    size += n
  return shards


def parse_size(text: str | int) -> int:
  """'10GB', '500MB', '2GiB' or a byte count -> bytes (GB = 10**9, GiB = 2**30)."""
  if isinstance(text, int):
    return text
  t = text.strip().upper()
  units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
  for u, mult in units.items():
    if t.endswith(u):
      return int(float(t[: -len(u)]) * mult)
  return int(t)


def as_numpy(x) -> np.ndarray:
  """numpy view of a numpy/jax array or a torch tensor (bfloat16 included)."""
  if hasattr(x, "detach"):  # torch, without importing it
    import ml_dtypes
    import torch

    x = x.detach().cpu().contiguous()
    if x.dtype == torch.bfloat16:
      return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return x.numpy()
  return np.asarray(x)


_FLOAT_CODES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


def check_float_dtypes(dtypes: Mapping[str, object], what: str) -> None:
  """Model weights are floating point: a tensor stored (or relabelled) as an integer or bool
  dtype would be converted bit for bit into nonsense, so it is refused, naming the tensor."""
  floats = {_DTYPES[c] for c in _FLOAT_CODES}
  for name, dt in dtypes.items():
    if np.dtype(dt) not in floats:
      raise ValueError(
        f"{what}: tensor {name!r} has dtype {np.dtype(dt)}, but model weights are "
        f"floating point ({', '.join(_FLOAT_CODES)}); the file is damaged or mislabelled"
      )
