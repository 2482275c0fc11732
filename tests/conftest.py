"""Test setup: 8 host CPU devices for pmap/shard_map tests, offline Hugging Face, Ray workers
at the tests' priority, and one on-disk cache of compiled programs for the whole session."""

import atexit
import os
import shutil
import tempfile

# Must happen before JAX is imported anywhere (pytest imports conftest first).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Ray starts its workers at nice 15, so a Ray run the tests start (the local_ray fixture, the
# smoke pipeline's reproduce process) waits while the other xdist worker has work: the smoke
# pipeline ran past its 10-minute limit so. Ray reads its config from RAY_<name> variables.
os.environ.setdefault("RAY_worker_niceness", "0")
# LLVM's expensive passes off (XLA's graph passes stay): the tests' programs are tiny and run
# a few times, so compiling them costs far more than running them; about a third less CPU
# time (tests/test_factored.py: 268 -> 171 CPU-s). Numbers move by float32 rounding only.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

# JAX's persistent compilation cache, shared by the xdist workers and every process the tests
# start (they inherit the environment, set here in pytest's main process before the workers
# start): the many runs of the same tiny configs compile each step once. A fresh folder per
# session, removed at exit, so no session depends on an earlier one; the size bound turns on
# JAX's file lock, so no process reads an entry another is still writing.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="nearprox-tests-jax-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
