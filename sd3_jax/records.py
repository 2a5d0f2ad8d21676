"""The latent-record format: a dataset of precomputed SD3 inputs on disk (ArrayRecord shards of
safetensors-serialized examples plus ``dataset_info.json``), its writer ``RecordWriter`` and its
readers ``RecordSource`` and ``SyntheticSource`` (random examples of the same element spec).
Non-finite values are refused when written and when read, whoever wrote the record; ids are
unique within a writer. The format, its guarantees and an example are in the README ("Training
data"); the grain iterators over these sources are in ``input_pipeline``.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import dataclasses
import json
import math
import os
import re
import struct
import uuid
from typing import Any, Mapping, Sequence

import grain
import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy
from array_record.python import array_record_module
from etils import epath

RECORD_FORMAT = "sd3_jax.latent_record/1"
DATASET_FORMAT = "sd3_jax.latent_records"
DATASET_VERSION = 1
INFO_FILE = "dataset_info.json"
TENSORS = {"latent": 3, "context": 2, "pooled": 1}  # name -> rank
_DTYPES = {"F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16), "F32": np.dtype(np.float32)}
DTYPES_BY_NAME = {"float16": _DTYPES["F16"], "bfloat16": _DTYPES["BF16"], "float32": _DTYPES["F32"]}
_ADVICE = (
  "The shard is damaged or was not written by sd3_jax.records.RecordWriter. Training "
  "stops rather than skipping it (skipping would silently change the data and break exact "
  "resume): re-create this shard with the dataset builder, or rebuild the dataset without it."
)

ElementSpec = dict[str, tuple[tuple[int, ...], np.dtype]]


class RecordError(ValueError):
  """A record or dataset that cannot be used as it is (corrupt, mismatched or malformed)."""


@dataclasses.dataclass(frozen=True)
class Example:
  """One decoded record. Arrays may be read-only views of the record bytes."""

  latent: np.ndarray  # [h, w, C]
  context: np.ndarray  # [L, D]
  pooled: np.ndarray  # [P]
  metadata: Mapping[str, str]

  @property
  def spec(self) -> ElementSpec:
    return {k: (tuple(getattr(self, k).shape), getattr(self, k).dtype) for k in TENSORS}


# ----------------------------------------------------------------------------- one record


def _check_arrays(arrays: Mapping[str, np.ndarray]) -> None:
  for name, rank in TENSORS.items():
    a = arrays[name]
    if a.ndim != rank:
      raise ValueError(f"{name} must have rank {rank}, got shape {a.shape}")
    if a.dtype not in DTYPES_BY_NAME.values():
      raise ValueError(f"{name} dtype must be float16, bfloat16 or float32, got {a.dtype}")


def encode_record(latent: np.ndarray, context: np.ndarray, pooled: np.ndarray, metadata: Mapping[str, str]) -> bytes:
  """Serializes one example (format in the module docstring). metadata needs a non-empty 'id'."""
  arrays = {
    "latent": np.ascontiguousarray(latent),
    "context": np.ascontiguousarray(context),
    "pooled": np.ascontiguousarray(pooled),
  }
  _check_arrays(arrays)
  for name, a in arrays.items():
    if not np.isfinite(a.astype(np.float32)).all():
      raise ValueError(
        f"{name} of example {metadata.get('id')!r} has non-finite values (fp16 overflow in a text encoder?)"
      )
  if not isinstance(metadata.get("id"), str) or not metadata["id"]:
    raise ValueError(f"metadata needs a non-empty string 'id', got {metadata!r}")
  if "format" in metadata or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
    raise ValueError(f"metadata must map str to str and must not set 'format', got {metadata!r}")
  return safetensors.numpy.save(arrays, metadata={"format": RECORD_FORMAT, **metadata})


_EXPONENT_BITS = {
  np.dtype(np.float16): (np.uint16, 0x7C00),
  np.dtype(ml_dtypes.bfloat16): (np.uint16, 0x7F80),
  np.dtype(np.float32): (np.uint32, 0x7F800000),
}


def all_finite(a: np.ndarray) -> bool:
  """No NaN/Inf. The record dtypes are tested on the bits (all exponent bits set): ~5x faster
  than np.isfinite on float16, which matters on the input pipeline's path."""
  a = np.asarray(a)
  if a.dtype not in _EXPONENT_BITS:
    return bool(np.isfinite(a).all())
  uint, mask = _EXPONENT_BITS[a.dtype]
  return not np.any((a.view(uint) & mask) == mask)


def decode_record(data: bytes) -> Example:
  """Parses ``encode_record`` bytes; raises RecordError saying what is wrong."""
  try:
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(bytes(data[8 : 8 + header_len]))
    tensors = safetensors.deserialize(data)  # validates offsets and sizes
    metadata = dict(header.get("__metadata__") or {})
  except Exception as e:  # struct.error, json/unicode errors, SafetensorError, a non-dict header
    raise RecordError(f"not a safetensors record ({type(e).__name__}: {e})") from e
  if metadata.pop("format", None) != RECORD_FORMAT:
    raise RecordError(f"missing or unknown record format (want {RECORD_FORMAT!r})")
  names = sorted(name for name, _ in tensors)
  if names != sorted(TENSORS):
    raise RecordError(f"record holds tensors {names}, want {sorted(TENSORS)}")
  arrays = {}
  for name, view in tensors:
    if view["dtype"] not in _DTYPES:
      raise RecordError(f"{name} has unsupported dtype {view['dtype']}")
    arrays[name] = np.frombuffer(view["data"], _DTYPES[view["dtype"]]).reshape(view["shape"])
  try:
    _check_arrays(arrays)
  except ValueError as e:
    raise RecordError(str(e)) from e
  for name, a in arrays.items():  # written by anything, not only encode_record
    if not all_finite(a):
      raise RecordError(
        f"{name} of record {metadata.get('id')!r} holds {int(np.size(a) - np.isfinite(a).sum())} NaN/Inf value(s)"
      )
  return Example(metadata=metadata, **arrays)


def _spec_to_json(spec: ElementSpec) -> dict:
  return {k: {"shape": list(shape), "dtype": dtype.name} for k, (shape, dtype) in spec.items()}


def _spec_from_json(d: Mapping) -> ElementSpec:
  try:
    return {k: (tuple(int(x) for x in d[k]["shape"]), DTYPES_BY_NAME[d[k]["dtype"]]) for k in TENSORS}
  except (KeyError, TypeError, ValueError) as e:
    raise RecordError(f"bad element_spec {d!r}: {e!r}") from e


# ----------------------------------------------------------------------------- writing


class RecordWriter:
  """Writes a dataset directory (module docstring), ``records_per_shard`` records per shard.

  with RecordWriter(out_dir, prefix="train", records_per_shard=1000) as w:
    for ...:
      w.write(latent, context, pooled, {"id": key, "caption": text})

  Shards go to hidden temporary names and are renamed to ``<prefix>-%05d-of-%05d.array_record``
  (the total is known only then) on ``close()``, after which ``dataset_info.json`` is written
  (atomically). An exception inside the ``with`` block (or ``abort()``) deletes the temporaries
  and leaves the directory as it was. Local file systems only (renames must be atomic).
  """

  def __init__(
    self,
    directory: str | os.PathLike,
    *,
    prefix: str = "data",
    records_per_shard: int = 1000,
    compression: str = "zstd:3",
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
  ):
    if records_per_shard < 1:
      raise ValueError(f"records_per_shard must be >= 1, got {records_per_shard}")
    if not re.fullmatch(r"[A-Za-z0-9_.]+(-[A-Za-z0-9_.]+)*", prefix):
      raise ValueError(f"prefix {prefix!r} must be letters, digits, '_', '.', '-'")
    self.directory = os.fspath(directory)
    os.makedirs(self.directory, exist_ok=True)
    existing = _list_shards(self.directory) + [f for f in os.listdir(self.directory) if f == INFO_FILE]
    if existing and not overwrite:
      raise FileExistsError(
        f"{self.directory} already holds a dataset ({sorted(existing)[:3]}...); "
        f"use an empty directory or pass overwrite=True"
      )
    self._old_files = existing
    self._prefix, self._per_shard, self._compression = prefix, records_per_shard, compression
    self._metadata = dict(metadata or {})
    self._token = uuid.uuid4().hex[:8]
    self._temps: list[str] = []  # finished or open temporary shard paths
    self._counts: list[int] = []  # records per shard
    self._writer = None
    self._spec: ElementSpec | None = None
    self._ids: dict[str, int] = {}  # id -> index of the record that has it (ids are unique)
    self._closed = False

  @property
  def num_written(self) -> int:
    return sum(self._counts)

  def write(self, latent: np.ndarray, context: np.ndarray, pooled: np.ndarray, metadata: Mapping[str, str]) -> None:
    """Appends one example; all examples must share shapes and dtypes."""
    if self._closed:
      raise ValueError("RecordWriter is closed")
    data = encode_record(latent, context, pooled, metadata)
    if metadata["id"] in self._ids:
      raise ValueError(
        f"duplicate record id {metadata['id']!r}: record {self._ids[metadata['id']]} "
        f"of {self.directory} already has it (ids must be unique)"
      )
    spec = {
      "latent": (np.shape(latent), np.asarray(latent).dtype),
      "context": (np.shape(context), np.asarray(context).dtype),
      "pooled": (np.shape(pooled), np.asarray(pooled).dtype),
    }
    if self._spec is None:
      self._spec = spec
    elif spec != self._spec:
      raise ValueError(
        f"example {metadata['id']!r} has spec {_spec_to_json(spec)}, but this dataset "
        f"is {_spec_to_json(self._spec)} (one shape/dtype per dataset directory)"
      )
    if self._writer is None:
      path = os.path.join(self.directory, f".{self._prefix}-{self._token}-{len(self._temps):05d}.tmp")
      self._writer = array_record_module.ArrayRecordWriter(path, f"group_size:1,{self._compression}")
      self._temps.append(path)
      self._counts.append(0)
    self._writer.write(data)
    self._ids[metadata["id"]] = self.num_written
    self._counts[-1] += 1
    if self._counts[-1] == self._per_shard:
      self._writer.close()
      self._writer = None

  def close(self) -> dict:
    """Finishes the shards, renames them and writes dataset_info.json; returns the info."""
    if self._closed:
      raise ValueError("RecordWriter is closed")
    if self._writer is not None:
      self._writer.close()
      self._writer = None
    if not self._counts:
      self.abort()
      raise ValueError(f"no records were written to {self.directory}")
    self._closed = True
    n = len(self._temps)
    names = [f"{self._prefix}-{i:05d}-of-{n:05d}.array_record" for i in range(n)]
    info = {
      "format": DATASET_FORMAT,
      "version": DATASET_VERSION,
      "num_records": self.num_written,
      "compression": self._compression,
      "element_spec": _spec_to_json(self._spec),
      "shards": [{"file": f, "num_records": c} for f, c in zip(names, self._counts)],
      "metadata": self._metadata,
    }
    for old in sorted(self._old_files, key=lambda f: f != INFO_FILE):  # info first: never stale
      os.remove(os.path.join(self.directory, old))
    for tmp, name in zip(self._temps, names):
      os.replace(tmp, os.path.join(self.directory, name))
    tmp_info = os.path.join(self.directory, f".{INFO_FILE}.{self._token}.tmp")
    with open(tmp_info, "w") as f:
      json.dump(info, f, indent=1)
    os.replace(tmp_info, os.path.join(self.directory, INFO_FILE))
    return info

  def abort(self) -> None:
    """Deletes everything written so far; the directory is left as it was."""
    self._closed = True
    if self._writer is not None:
      self._writer.close()
      self._writer = None
    for tmp in self._temps:
      if os.path.exists(tmp):
        os.remove(tmp)

  def __enter__(self) -> "RecordWriter":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is not None:
      self.abort()
    elif not self._closed:
      self.close()


def _list_shards(directory: str | os.PathLike) -> list[str]:
  return sorted(p.name for p in epath.Path(directory).iterdir() if p.name.endswith(".array_record"))


# ----------------------------------------------------------------------------- sources


@dataclasses.dataclass(frozen=True)
class _FileInstruction:  # array_record's FileInstruction protocol: open files lazily
  filename: str
  skip: int
  take: int
  examples_in_shard: int


class RecordSource:
  """Random access over a dataset directory written by RecordWriter (a grain data source).

  ``source[i]`` is an ``Example``. Construction checks dataset_info.json against the files
  (same set of shards; with ``verify_shards`` also each shard's record count, opening every
  file), and ``expected_shapes`` (e.g. {"latent": (None, None, 16), "context": (None, 4096),
  "pooled": (2048,)}, None = any size) against the element spec. A record that cannot be read
  or decoded raises RecordError naming the shard file and the record index in it.
  """

  def __init__(
    self,
    directory: str | os.PathLike,
    *,
    expected_shapes: Mapping[str, Sequence[int | None]] | None = None,
    verify_shards: bool = True,
  ):
    self.directory = epath.Path(directory)
    if not self.directory.is_dir():
      raise FileNotFoundError(f"dataset directory {self.directory} does not exist")
    info_path = self.directory / INFO_FILE
    present = _list_shards(self.directory)
    if not info_path.exists():
      if present:
        raise RecordError(
          f"{self.directory} has {len(present)} shard(s) but no {INFO_FILE}: the "
          f"writer did not finish (crashed?) or this is not an sd3_jax dataset; "
          f"rebuild it with RecordWriter"
        )
      raise FileNotFoundError(
        f"no dataset in {self.directory}: expected {INFO_FILE} and "
        f"<prefix>-NNNNN-of-NNNNN.array_record shards (see RecordWriter)"
      )
    try:
      info = json.loads(info_path.read_text())
      if info.get("format") != DATASET_FORMAT or info.get("version") != DATASET_VERSION:
        raise RecordError(
          f"not a {DATASET_FORMAT} v{DATASET_VERSION} dataset (format="
          f"{info.get('format')!r}, version={info.get('version')!r})"
        )
      listed = [str(s["file"]) for s in info["shards"]]
      self._counts = [int(s["num_records"]) for s in info["shards"]]
      self.element_spec: ElementSpec = _spec_from_json(info["element_spec"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
      raise RecordError(f"cannot use {info_path}: {type(e).__name__}: {e}") from e
    self.info = info
    if not listed:
      raise RecordError(f"{info_path} lists no shards")
    missing, extra = sorted(set(listed) - set(present)), sorted(set(present) - set(listed))
    if missing or extra:
      raise RecordError(
        f"{info_path} does not match the directory: missing shards {missing[:5]}, "
        f"unlisted shards {extra[:5]} (partial copy, or left over from another "
        f"dataset?); rebuild or re-copy the dataset"
      )
    if sum(self._counts) != info.get("num_records") or min(self._counts) < 1:
      raise RecordError(
        f"{info_path}: shard counts {self._counts[:5]}... do not add up to num_records={info.get('num_records')}"
      )
    self._paths = [os.fspath(self.directory / f) for f in listed]
    if verify_shards:
      self._verify_shards()
    if expected_shapes:
      for name, want in expected_shapes.items():
        have = self.element_spec[name][0]
        if len(want) != len(have) or any(w is not None and w != h for w, h in zip(want, have)):
          raise RecordError(
            f"{self.directory}: {name} has shape {list(have)}, expected "
            f"{list(want)} (None = any); was the dataset built for another model?"
          )
    self._ends = np.cumsum(self._counts).tolist()
    self._source = grain.sources.ArrayRecordDataSource(
      [_FileInstruction(p, 0, c, c) for p, c in zip(self._paths, self._counts)]
    )

  def _verify_shards(self) -> None:
    def count(path):
      try:
        reader = array_record_module.ArrayRecordReader(path)
        n = reader.num_records()
        reader.close()
        return n
      except Exception as e:  # riegeli raises RuntimeError on a truncated or damaged footer
        raise RecordError(f"{path}: cannot open shard ({e}). {_ADVICE}") from e

    with concurrent.futures.ThreadPoolExecutor(min(16, len(self._paths))) as pool:
      for path, want, got in zip(self._paths, self._counts, pool.map(count, self._paths)):
        if want != got:
          raise RecordError(f"{path} holds {got} records but {INFO_FILE} says {want}. {_ADVICE}")

  def __len__(self) -> int:
    return self._ends[-1]

  def locate(self, index: int) -> tuple[str, int]:
    """(shard path, record index within that shard) of a global index."""
    shard = bisect.bisect_right(self._ends, index)
    return self._paths[shard], index - (self._ends[shard - 1] if shard else 0)

  def __getitem__(self, index: int) -> Example:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"record {index} out of range [0, {len(self)})")
    try:
      example = decode_record(self._source[index])
      if example.spec != self.element_spec:
        raise RecordError(f"spec {_spec_to_json(example.spec)} differs from {INFO_FILE}")
    except Exception as e:
      path, local = self.locate(index)
      raise RecordError(
        f"{path}: record {local} (global index {index}) is unreadable: {type(e).__name__}: {e}. {_ADVICE}"
      ) from e
    return example

  def __repr__(self) -> str:
    return f"RecordSource({os.fspath(self.directory)!r}, {len(self)} records)"


class SyntheticSource:
  """Random examples with the record element spec, deterministic per (seed, index).

  Values are unit-variance uniform noise (cheaper to generate than Gaussian; the content does not
  matter for benchmarks and tests). ``record_bytes(i)`` gives the encoded record, to build an
  on-disk synthetic dataset.
  """

  def __init__(
    self,
    num_records: int,
    latent_shape: Sequence[int],
    context_len: int,
    context_dim: int,
    pooled_dim: int,
    seed: int,
    *,
    dtype: Any = np.float16,
  ):
    if num_records < 1 or len(latent_shape) != 3:
      raise ValueError(f"need num_records >= 1 and latent_shape (h, w, C), got {num_records}, {latent_shape}")
    self._n, self._seed = int(num_records), int(seed)
    dtype = np.dtype(dtype)
    if dtype not in DTYPES_BY_NAME.values():
      raise ValueError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
    self.element_spec: ElementSpec = {
      "latent": (tuple(latent_shape), dtype),
      "context": ((context_len, context_dim), dtype),
      "pooled": ((pooled_dim,), dtype),
    }

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, index: int) -> Example:
    index = int(index)
    if not 0 <= index < self._n:
      raise IndexError(f"record {index} out of range [0, {self._n})")
    rng = np.random.default_rng([self._seed, index])
    arrays = {}
    for name, (shape, dtype) in self.element_spec.items():
      u = rng.random(shape, dtype=np.float32)
      arrays[name] = ((u - np.float32(0.5)) * np.float32(2 * math.sqrt(3))).astype(dtype)
    return Example(metadata={"id": f"synthetic-{self._seed}-{index}", "caption": ""}, **arrays)

  def record_bytes(self, index: int) -> bytes:
    ex = self[index]
    return encode_record(ex.latent, ex.context, ex.pooled, ex.metadata)

  def __repr__(self) -> str:
    return f"SyntheticSource({self._n}, {_spec_to_json(self.element_spec)}, seed={self._seed})"


class SliceSource:
  """Records [start, stop) of another source, renumbered from 0: a held-out validation slice of
  a training set, or the training set without it (config.data.val_holdout)."""

  def __init__(self, source, start: int, stop: int):
    if not 0 <= start < stop <= len(source):
      raise ValueError(f"slice [{start}, {stop}) is empty or outside {source!r} ({len(source)} records)")
    self._source, self._start, self._stop = source, int(start), int(stop)
    self.element_spec: ElementSpec = source.element_spec
    self.directory = getattr(source, "directory", None)

  def __len__(self) -> int:
    return self._stop - self._start

  def __getitem__(self, index: int) -> Example:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"record {index} out of range [0, {len(self)})")
    return self._source[self._start + index]

  def __repr__(self) -> str:
    return f"SliceSource({self._source!r}, [{self._start}, {self._stop}))"
