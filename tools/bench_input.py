r"""Speed of the input pipeline alone: records/s one host reads from local disk.

  python -m tools.bench_input --dir /tmp/sd3_bench_records [--resolution 256] [--num_records 512]
      [--batch 64] [--batches 40] [--worker_counts 0,2] [--chip_images_per_sec 246.2] [--json]

Writes ``--num_records`` synthetic records of the training shape (float16 latent
[r/8, r/8, 16], context [154, 4096], pooled [2048], zstd, as ``sd3-build-dataset`` writes
them) once, then times ``input_pipeline.make_train_iterator`` over them (host batches of
``--batch``, stored dtype, no device) for each worker count: records/s and MB/s. How many chips
one host feeds = records/s over the images/s one chip consumes (``--chip_images_per_sec``, an
assumption: the default is diffusers' SD3 d=24 256^2 step with torch.compile on one H200,
docs/performance.md). The records are read through the OS file cache after being written;
a cold read from a slower disk can only be slower.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags

from sd3_jax.data import input_pipeline, records, sources

_DIR = flags.DEFINE_string("dir", "/tmp/sd3_bench_records", "Where the synthetic records live (reused).")
_RES = flags.DEFINE_integer("resolution", 256, "Image resolution (latent side = resolution / 8).")
_N = flags.DEFINE_integer("num_records", 512, "Records to write (each ~1.3 MB at 154 text tokens).")
_BATCH = flags.DEFINE_integer("batch", 64, "Host batch size.")
_BATCHES = flags.DEFINE_integer("batches", 40, "Timed batches per worker count (after 2 warm-up).")
_WORKERS = flags.DEFINE_list("worker_counts", ["0", "2"], "grain worker processes to try.")
_CHIP = flags.DEFINE_float("chip_images_per_sec", 246.2, "Images/s one chip consumes (assumption).")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object.")


def ensure_records(directory: str, num_records: int, resolution: int) -> sources.RecordSource:
  latent = resolution // 8
  if os.path.exists(os.path.join(directory, records.INFO_FILE)):
    src = sources.RecordSource(directory)
    if len(src) == num_records and src.element_spec["latent"][0] == (latent, latent, 16):
      return src
    raise SystemExit(f"{directory} holds other records; pass a fresh --dir")
  syn = sources.SyntheticSource(num_records, (latent, latent, 16), 154, 4096, 2048, seed=0)
  with records.RecordWriter(directory, records_per_shard=256) as w:
    for i in range(num_records):
      ex = syn[i]
      w.write(ex.latent, ex.context, ex.pooled, dict(ex.metadata))
  return sources.RecordSource(directory)


def measure(source, batch: int, batches: int, workers: int) -> dict:
  it = input_pipeline.make_train_iterator(
    source, global_batch_size=batch, seed=0, process_index=0, process_count=1, dtype=None, worker_count=workers
  )
  for _ in range(2):
    next(it)
  nbytes = 0
  t0 = time.perf_counter()
  for _ in range(batches):
    nbytes += sum(v.nbytes for v in next(it).values())
  dt = time.perf_counter() - t0
  return {
    "worker_count": workers,
    "records_per_sec": batch * batches / dt,
    "mb_per_sec": nbytes / dt / 1e6,
    "seconds": dt,
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  src = ensure_records(_DIR.value, _N.value, _RES.value)
  rows = [measure(src, _BATCH.value, _BATCHES.value, int(w)) for w in _WORKERS.value]
  best = max(r["records_per_sec"] for r in rows)
  out = {
    "resolution": _RES.value,
    "num_records": len(src),
    "cpu_count": os.cpu_count(),
    "batch": _BATCH.value,
    "rows": rows,
    "chip_images_per_sec_assumed": _CHIP.value,
    "chips_fed_per_host": best / _CHIP.value,
  }
  if _JSON.value:
    print(json.dumps(out))
    return
  print(f"{len(src)} records at {_RES.value}^2 in {_DIR.value}, host batch {_BATCH.value}, {os.cpu_count()} CPU cores")
  for r in rows:
    print(f"  workers {r['worker_count']:2d}: {r['records_per_sec']:8.1f} records/s ({r['mb_per_sec']:.0f} MB/s)")
  print(f"  one host feeds {out['chips_fed_per_host']:.1f} chips at {_CHIP.value} images/s per chip (assumed)")


if __name__ == "__main__":
  app.run(main)
