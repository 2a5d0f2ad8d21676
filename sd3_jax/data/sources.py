"""Readers of the latent-record format (``data.records``): ``RecordSource`` (random access over a
dataset directory, a grain data source), ``SyntheticSource`` (random examples of the same element
spec) and ``SliceSource`` (a view of a range of another source)."""

from __future__ import annotations

import bisect
import concurrent.futures
import dataclasses
import json
import math
import os
from typing import Any, Mapping, Sequence

import grain
import numpy as np
from array_record.python import array_record_module
from etils import epath

from sd3_jax.data import records


@dataclasses.dataclass(frozen=True)
class _FileInstruction:  # array_record's FileInstruction protocol: open files lazily
  filename: str
  skip: int
  take: int
  examples_in_shard: int


class RecordSource:
  """Random access over a dataset directory written by RecordWriter (a grain data source).

  ``source[i]`` is an ``records.Example``. Construction checks dataset_info.json against the files
  (same set of shards; with ``verify_shards`` also each shard's record count, opening every
  file), and ``expected_shapes`` (e.g. {"latent": (None, None, 16), "context": (None, 4096),
  "pooled": (2048,)}, None = any size) against the element spec. A record that cannot be read
  or decoded raises records.RecordError naming the shard file and the record index in it.
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
    info_path = self.directory / records.INFO_FILE
    present = records.list_shards(self.directory)
    if not info_path.exists():
      if present:
        raise records.RecordError(
          f"{self.directory} has {len(present)} shard(s) but no {records.INFO_FILE}: the "
          f"writer did not finish (crashed?) or this is not an sd3_jax dataset; "
          f"rebuild it with RecordWriter"
        )
      raise FileNotFoundError(
        f"no dataset in {self.directory}: expected {records.INFO_FILE} and "
        f"<prefix>-NNNNN-of-NNNNN.array_record shards (see RecordWriter)"
      )
    try:
      info = json.loads(info_path.read_text())
      if info.get("format") != records.DATASET_FORMAT or info.get("version") != records.DATASET_VERSION:
        raise records.RecordError(
          f"not a {records.DATASET_FORMAT} v{records.DATASET_VERSION} dataset (format="
          f"{info.get('format')!r}, version={info.get('version')!r})"
        )
      listed = [str(s["file"]) for s in info["shards"]]
      self._counts = [int(s["num_records"]) for s in info["shards"]]
      self.element_spec: records.ElementSpec = records.spec_from_json(info["element_spec"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
      raise records.RecordError(f"cannot use {info_path}: {type(e).__name__}: {e}") from e
    self.info = info
    if not listed:
      raise records.RecordError(f"{info_path} lists no shards")
    missing, extra = sorted(set(listed) - set(present)), sorted(set(present) - set(listed))
    if missing or extra:
      raise records.RecordError(
        f"{info_path} does not match the directory: missing shards {missing[:5]}, "
        f"unlisted shards {extra[:5]} (partial copy, or left over from another "
        f"dataset?); rebuild or re-copy the dataset"
      )
    if sum(self._counts) != info.get("num_records") or min(self._counts) < 1:
      raise records.RecordError(
        f"{info_path}: shard counts {self._counts[:5]}... do not add up to num_records={info.get('num_records')}"
      )
    self._paths = [os.fspath(self.directory / f) for f in listed]
    if verify_shards:
      self._verify_shards()
    if expected_shapes:
      for name, want in expected_shapes.items():
        have = self.element_spec[name][0]
        if len(want) != len(have) or any(w is not None and w != h for w, h in zip(want, have)):
          raise records.RecordError(
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
        raise records.RecordError(f"{path}: cannot open shard ({e}). {records.ADVICE}") from e

    with concurrent.futures.ThreadPoolExecutor(min(16, len(self._paths))) as pool:
      for path, want, got in zip(self._paths, self._counts, pool.map(count, self._paths)):
        if want != got:
          raise records.RecordError(f"{path} holds {got} records but {records.INFO_FILE} says {want}. {records.ADVICE}")

  def __len__(self) -> int:
    return self._ends[-1]

  def locate(self, index: int) -> tuple[str, int]:
    """(shard path, record index within that shard) of a global index."""
    shard = bisect.bisect_right(self._ends, index)
    return self._paths[shard], index - (self._ends[shard - 1] if shard else 0)

  def __getitem__(self, index: int) -> records.Example:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"record {index} out of range [0, {len(self)})")
    try:
      example = records.decode_record(self._source[index])
      if example.spec != self.element_spec:
        raise records.RecordError(f"spec {records.spec_to_json(example.spec)} differs from {records.INFO_FILE}")
    except Exception as e:
      path, local = self.locate(index)
      raise records.RecordError(
        f"{path}: record {local} (global index {index}) is unreadable: {type(e).__name__}: {e}. {records.ADVICE}"
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
    if dtype not in records.DTYPES_BY_NAME.values():
      raise ValueError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
    self.element_spec: records.ElementSpec = {
      "latent": (tuple(latent_shape), dtype),
      "context": ((context_len, context_dim), dtype),
      "pooled": ((pooled_dim,), dtype),
    }

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, index: int) -> records.Example:
    index = int(index)
    if not 0 <= index < self._n:
      raise IndexError(f"record {index} out of range [0, {self._n})")
    rng = np.random.default_rng([self._seed, index])
    arrays = {}
    for name, (shape, dtype) in self.element_spec.items():
      u = rng.random(shape, dtype=np.float32)
      arrays[name] = ((u - np.float32(0.5)) * np.float32(2 * math.sqrt(3))).astype(dtype)
    return records.Example(metadata={"id": f"synthetic-{self._seed}-{index}", "caption": ""}, **arrays)

  def record_bytes(self, index: int) -> bytes:
    ex = self[index]
    return records.encode_record(ex.latent, ex.context, ex.pooled, ex.metadata)

  def __repr__(self) -> str:
    return f"SyntheticSource({self._n}, {records.spec_to_json(self.element_spec)}, seed={self._seed})"


class SliceSource:
  """Records [start, stop) of another source, renumbered from 0: a held-out validation slice of
  a training set, or the training set without it (config.data.val_holdout)."""

  def __init__(self, source, start: int, stop: int):
    if not 0 <= start < stop <= len(source):
      raise ValueError(f"slice [{start}, {stop}) is empty or outside {source!r} ({len(source)} records)")
    self._source, self._start, self._stop = source, int(start), int(stop)
    self.element_spec: records.ElementSpec = source.element_spec
    self.directory = getattr(source, "directory", None)

  def __len__(self) -> int:
    return self._stop - self._start

  def __getitem__(self, index: int) -> records.Example:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"record {index} out of range [0, {len(self)})")
    return self._source[self._start + index]

  def __repr__(self) -> str:
    return f"SliceSource({self._source!r}, [{self._start}, {self._stop}))"
