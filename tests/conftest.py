"""Test-session settings, inherited by the processes tests start: compile fast, compile once.

The tests' programs are tiny, so XLA's backend optimisations cost far more compile time than they save
run time (level 0 halves a tiny training run's wall time); and many tests compile the same programs, in
this process and in the processes they start, so a persistent compilation cache compiles each once.
"""

import os
import tempfile
import pytest

# One cache folder per pytest-xdist worker (PYTEST_XDIST_WORKER: gw0, gw1, ...; unset without xdist): JAX writes
# cache entries in place, not atomically, so two workers compiling the same program at once could read each
# other's half-written entry (JAX then warns and recompiles, which tests that count output lines would see). JAX
# locks its cache only when a size bound is set, and then scans the whole folder under the lock at every write,
# which serialises the workers. A worker and the processes its tests start run one at a time, so they share the
# worker's folder.
_worker = os.environ.get("PYTEST_XDIST_WORKER", "")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), "jaxdiff-test-xla-cache" + (f"-{_worker}" if _worker else "")),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()


@pytest.fixture(scope="session")
def torch():
    """PyTorch for the parity tests against the original implementations (skipped where it is not installed)."""
    return pytest.importorskip("torch")


@pytest.fixture(scope="session")
def diffusers(torch):
    return pytest.importorskip("diffusers")
