"""Test-session settings, inherited by the processes tests start: compile fast, compile once.

The tests' programs are tiny, so XLA's backend optimisations cost far more compile time than they save
run time (level 0 halves a tiny training run's wall time); and many tests compile the same programs, in
this process and in the processes they start, so a persistent compilation cache compiles each once.
"""

import os
import tempfile
import pytest

# One cache folder for the session's pytest-xdist workers and the processes their tests start, so that a program
# compiled by one is loaded by the others. A size bound makes JAX guard every cache read and write with a file lock
# (without one it writes entries in place, and a reader could see half an entry).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "jaxdiff-test-xla-cache"))
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 * 2**30))
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
