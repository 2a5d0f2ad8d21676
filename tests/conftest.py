"""Test set-up (must happen before jax is imported): 8 fake CPU devices for sharding tests, and
one persistent compilation cache for the whole session.

Many tests (and the training commands they start in subprocesses, which inherit the
environment) compile the same tiny train step; jax's persistent cache lets every compile after
the first load the executable instead, which cuts the suite's time by a large factor without
changing what runs. The cache lives in a fresh temporary directory removed at exit, so no test
ever sees executables from an earlier session or another checkout."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
  os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="sd3_jax_tests_jit_cache_")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
