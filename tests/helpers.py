"""Shared test utilities: paths and subprocess runners."""

import os
import pathlib
import socket
import subprocess
import sys

import jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_CONFIG = str(ROOT / "configs" / "tiny.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def xla_flags(devices: int) -> str:
    """The session's XLA flags (see conftest.py) plus `devices` simulated CPU devices."""
    return f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()


# JAX's persistent compilation cache (conftest.py) makes multi-process CPU jobs deadlock on JAX 0.12.1: a
# process that loads a cached program with collectives waits forever in its first cross-process collective
# (seen on the gloo collectives, 2026-12-06; JAX 0.10 is unaffected). Multi-process tests run without it.
_CACHE_VARIABLES = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
                    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES")  # fmt: skip


def multi_process_env(**extra) -> dict:
    """The environment for one process of a multi-process (loopback) job: CPU only, no compilation cache."""
    env = {name: value for name, value in os.environ.items() if name not in _CACHE_VARIABLES}
    return {**env, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1", **extra}


def run_python(code: str, *, devices: int = 1, timeout: float = 300, env: dict | None = None) -> str:
    """Run `code` in a fresh interpreter with `devices` simulated CPU devices; returns stdout, raises on failure."""
    full_env = {**os.environ, "XLA_FLAGS": xla_flags(devices),
                "JAX_PLATFORMS": "cpu", **(env or {})}  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT
    )
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-5000:]}")
    return proc.stdout


def write_workdir(path, *overrides):
    """A jaxdiff workdir with a tiny model's checkpoint at step 7 (EMA weights perturbed away from the raw ones)."""
    from jaxdiff.training import checkpoint
    from jaxdiff.cli import load_config
    from jaxdiff.models import create_model
    from jaxdiff.training.step import init_train_state, make_optimizer

    config = load_config(TINY_CONFIG, list(overrides))
    model = create_model(config.model)
    state = jax.jit(lambda: init_train_state(config, model, make_optimizer(config.training)))()
    # Perturb the EMA weights so samples depend on them (the near-zero output layer would hide them).
    ema = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(1), p.shape), state.params)
    checkpoint.save_model(path, config, state.params, ema, step=7)
    return config
