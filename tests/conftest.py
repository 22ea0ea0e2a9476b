"""Test-session settings, inherited by the processes tests start: compile fast, compile once.

The tests' programs are tiny, so XLA's backend optimisations cost far more compile time than they save
run time (level 0 halves a tiny training run's wall time); and many tests compile the same programs, in
this process and in the processes they start, so a persistent compilation cache compiles each once.
"""

import os
import subprocess
import sys
import tempfile
import types

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
# Programs that compile in under a second (the op-by-op programs of eager reference loops: hundreds per module)
# cost more to write to and read from the folder than to compile again; the train steps and samplers are cached.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
# XLA:CPU's older loop emitters compile the thousands of one-operation programs of eager code (parameter
# initialisers, reference loops) in about 0.6x the time of its fusion emitters, and a test module's cold run in
# about 0.8x (BUILD_NOTES.md, "Test suite and CI"). jaxlib 0.10 has the switch; later ones dropped it, and XLA aborts
# on a flag it does not know, so a child process tries it once. The test workers and the processes tests start
# inherit the flags the first pytest process sets.
_LEGACY_EMITTERS = "--xla_cpu_use_fusion_emitters=false"
_SET = "JAXDIFF_TEST_XLA_FLAGS_SET"
if _SET not in os.environ:
    os.environ[_SET] = "1"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
    _flags = f"{os.environ['XLA_FLAGS']} {_LEGACY_EMITTERS}"
    try:
        _probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], timeout=300,
                                env={**os.environ, "XLA_FLAGS": _flags}, capture_output=True).returncode  # fmt: skip
    except subprocess.TimeoutExpired:
        _probe = None
    if _probe == 0:
        os.environ["XLA_FLAGS"] = _flags


@pytest.fixture(scope="session")
def torch():
    """PyTorch for the parity tests against the original implementations (skipped where it is not installed)."""
    return pytest.importorskip("torch")


@pytest.fixture(scope="session")
def diffusers(torch):
    return pytest.importorskip("diffusers")


# The tests that need PyTorch (parity with the original implementations) carry the `torch` marker, set here:
# those using the `torch` fixture (or one built on it, as `diffusers`) and those of a module that imports torch
# with `pytest.importorskip` at its top. A test that imports PyTorch itself takes the fixture instead.
# CI runs each test once: the ones marked `torch` on the Python that has PyTorch, the others on the newest
# Python with the newest JAX (see .ci/run).


def pytest_collection_modifyitems(items):
    for item in items:
        module_torch = getattr(item.module, "torch", None)
        imports_torch = isinstance(module_torch, types.ModuleType) and module_torch.__name__ == "torch"
        if "torch" in item.fixturenames or imports_torch:
            item.add_marker(pytest.mark.torch)


_NEEDS_TORCH = tuple(f"could not import {name!r}" for name in ("torch", "diffusers", "peft", "accelerate"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A test skipped for want of PyTorch without the `torch` marker fails: CI would run it on neither Python."""
    report = yield
    if report.skipped and not item.get_closest_marker("torch"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if any(needs in reason for needs in _NEEDS_TORCH):
            report.outcome = "failed"
            report.longrepr = f"{item.nodeid} needs PyTorch ({reason}): mark it @pytest.mark.torch"
    return report
