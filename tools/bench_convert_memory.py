"""Peak memory and wall time of checkpoint conversion at full scale (8B, SD3.5-large shaped).

  python tools/bench_convert_memory.py                  # d=38, qk-norm, bfloat16 (about 16 GB)
  python tools/bench_convert_memory.py --depth 12       # a quick trial of the script itself

Writes a randomly initialised bfloat16 original single-file checkpoint tensor by tensor (never
holding the model), then runs each direction as its own subprocess of the real CLI:

  sd3 -> jax,  jax -> sd3 (then compared with the generated file),  jax -> diffusers

and reports per direction the converter's peak resident set size (VmHWM, read by the child
itself at exit) with a breakdown of anonymous vs file-backed pages sampled from /proc every
50 ms, plus wall time. Disk: about
3x the checkpoint at peak (source, jax copy, one output); everything lives under a temporary
directory that is removed at the end (unless --keep).
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # host-only work; skip accelerator probing

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import ml_dtypes
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from sd3_jax import command  # noqa: E402
from sd3_jax.models.mmdit import MMDiTConfig  # noqa: E402
from sd3_jax.convert import mmdit_keys as K  # noqa: E402
from sd3_jax.convert.safetensors_io import SafetensorsReader, SafetensorsWriter  # noqa: E402

GiB = 2**30


def generate(path: str, cfg: MMDiTConfig, seed: int = 0) -> int:
  """Random-normal bf16 original single file; each tensor is a random slice of a 64M-value
  pool (drawing 8B fresh normals would dominate the run). Returns bytes written."""
  rng = np.random.default_rng(seed)
  pool = (0.02 * rng.standard_normal(1 << 26, dtype=np.float32)).astype(ml_dtypes.bfloat16)
  entries = K.entries(cfg, "sd3")
  specs = [(K.SD3_PREFIX + e.name, pool.dtype, e.shape) for e in entries]
  total = 0
  with SafetensorsWriter(path, specs, {"format": "pt"}) as w:
    for e in entries:
      n = int(np.prod(e.shape))
      out, pos, start = np.empty(n, pool.dtype), 0, int(rng.integers(0, pool.size))
      while pos < n:  # pool[start:], then wrap around
        m = min(n - pos, pool.size - start)
        out[pos : pos + m] = pool[start : start + m]
        pos, start = pos + m, 0
      w.write(K.SD3_PREFIX + e.name, out.reshape(e.shape))
      total += out.nbytes
  return total


def _proc_rss(pid: int) -> tuple[int, int]:
  """(RssAnon, RssFile) in bytes of a live process (0, 0 once it is gone)."""
  anon = file_ = 0
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("RssAnon:"):
          anon = int(line.split()[1]) * 1024
        elif line.startswith("RssFile:"):
          file_ = int(line.split()[1]) * 1024
  except (FileNotFoundError, ProcessLookupError):
    pass
  return anon, file_


# Runs the CLI and, at exit, prints the process's own peak RSS (VmHWM of its address space
# since exec). wait4's ru_maxrss is not used: on Linux it also counts the parent's RSS at
# fork/exec time, which would hide the converter's own figure.
_RUNNER = """
import atexit, runpy, sys
def _hwm():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM:'):
            sys.stdout.write('@@VmHWM %d\\n' % (int(line.split()[1]) * 1024))
            sys.stdout.flush()
atexit.register(_hwm)
sys.argv = ['tools.convert_weights'] + sys.argv[1:]
runpy.run_module('tools.convert_weights', run_name='__main__', alter_sys=True)
"""


def run_measured(cli_args: list[str]) -> dict:
  """Runs the converter CLI; returns its wall time, exact peak RSS and sampled anon/file peaks."""
  t0 = time.time()
  argv = [sys.executable, "-c", _RUNNER] + cli_args
  proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  peaks = {"anon": 0, "file": 0}
  stop = threading.Event()

  def sample():
    while not stop.is_set():
      a, f = _proc_rss(proc.pid)
      peaks["anon"], peaks["file"] = max(peaks["anon"], a), max(peaks["file"], f)
      stop.wait(0.05)

  th = threading.Thread(target=sample, daemon=True)
  th.start()
  out = proc.stdout.read()
  proc.wait()
  stop.set()
  th.join()
  if proc.returncode:
    raise RuntimeError(f"{' '.join(cli_args)} failed ({proc.returncode}):\n{out}")
  lines = out.strip().splitlines()
  hwm = [int(l.split()[1]) for l in lines if l.startswith("@@VmHWM ")]
  if not hwm:
    raise RuntimeError(f"no peak RSS reported by {' '.join(cli_args)}:\n{out}")
  msgs = [l for l in lines if l.startswith("wrote ")]
  return {
    "wall_s": time.time() - t0,
    "peak_rss_gib": hwm[0] / GiB,
    "sampled_peak_anon_gib": peaks["anon"] / GiB,
    "sampled_peak_file_gib": peaks["file"] / GiB,
    "output": msgs[-1] if msgs else "",
  }


def compare_files(a: str, b: str) -> int:
  """Bit-exact comparison of two safetensors files, tensor by tensor; returns tensors compared."""
  ra, rb = SafetensorsReader(a), SafetensorsReader(b)
  if sorted(ra.keys()) != sorted(rb.keys()):
    raise AssertionError(f"{a} and {b} hold different tensors")
  for k in ra.keys():
    x, y = ra.read(k), rb.read(k)
    if x.dtype != y.dtype or x.shape != y.shape or not np.array_equal(x.view(np.uint16), y.view(np.uint16)):
      raise AssertionError(f"tensor {k} differs between {a} and {b}")
  return len(ra.keys())


def du(path: str) -> int:
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main() -> int:
  p = command.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--depth", type=int, default=38, help="model depth d (hidden 64d); 38 = SD3.5-large, 8B")
  p.add_argument("--no-qk-norm", action="store_true", help="SD3-style blocks without qk-norm")
  p.add_argument("--workdir", default=None, help="where to put the temporary files (default: system temp)")
  p.add_argument("--keep", action="store_true", help="keep the files")
  p.add_argument("--no-verify", action="store_true", help="skip the bit-exact sd3 round-trip comparison")
  p.add_argument("--json", default=None, help="also write the results to this JSON file")
  args = p.parse_args()

  cfg = MMDiTConfig(depth=args.depth, qk_norm=not args.no_qk_norm)
  work = tempfile.mkdtemp(prefix="bench_convert_", dir=args.workdir)
  src, jx = os.path.join(work, "gen.safetensors"), os.path.join(work, "jax")
  mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
  results: dict = {
    "machine": {"cpus": os.cpu_count(), "mem_gib": round(mem, 1), "platform": platform.platform()},
    "config": cfg.to_dict(),
    "runs": {},
  }
  try:
    t0 = time.time()
    nbytes = generate(src, cfg)
    results["checkpoint_gib"] = nbytes / GiB
    results["params"] = nbytes // 2
    results["generate_s"] = time.time() - t0
    print(
      f"generated d={cfg.depth} ({nbytes // 2 / 1e9:.3f}B params, {nbytes / GiB:.2f} GiB bf16) "
      f"in {results['generate_s']:.0f}s",
      flush=True,
    )

    def step(name, argv, out):
      r = run_measured(argv)
      r["output_gib"] = du(out) / GiB
      results["runs"][name] = r
      print(
        f"{name:18s} peak RSS {r['peak_rss_gib']:6.2f} GiB (sampled: anon "
        f"{r['sampled_peak_anon_gib']:.2f}, file {r['sampled_peak_file_gib']:.2f})  "
        f"wall {r['wall_s']:6.1f}s  output {r['output_gib']:.2f} GiB",
        flush=True,
      )

    step("sd3 -> jax", ["--src", src, "--dst", jx, "--to", "jax"], jx)
    out_sd3 = os.path.join(work, "back.safetensors")
    step("jax -> sd3", ["--src", jx, "--dst", out_sd3, "--to", "sd3"], out_sd3)
    if not args.no_verify:
      t = time.time()
      n = compare_files(src, out_sd3)
      results["verify"] = {"tensors_bit_exact": n, "seconds": time.time() - t}
      print(f"sd3 -> jax -> sd3 is bit-exact on all {n} tensors ({time.time() - t:.0f}s)", flush=True)
    if not args.keep:
      os.remove(out_sd3)
      os.remove(src)
    out_df = os.path.join(work, "diffusers")
    step("jax -> diffusers", ["--src", jx, "--dst", out_df, "--to", "diffusers"], out_df)
  finally:
    if args.keep:
      print(f"files kept under {work}")
    else:
      shutil.rmtree(work, ignore_errors=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)
  print(json.dumps({k: v for k, v in results.items() if k != "config"}, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
