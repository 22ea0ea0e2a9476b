"""How jaxdiff compiles its inference programs: `inference_jit` is `jax.jit` with XLA options for the backend.

On the CPU backend the programs are scheduled by XLA's memory-optimised scheduler
(`xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED`) instead of its default, which orders
operations for concurrency and keeps more buffers alive at once. Only the order of operations changes, so the
outputs are bitwise those of the default schedule. Measured on SD 1.5's sizes (BUILD_NOTES.md,
"Memory and loading"): the temporaries of the VAE decode at 512² fall from 0.875 to 0.625 GiB and those of the
U-Net at batch 2, 64² latents from 0.484 to 0.338 GiB, at the same speed. Other backends compile with their defaults.

Inside a compiled loop (a sampler's `lax.scan`), XLA hoists whatever depends only on the parameters out of the
loop: on the CPU backend, which has no bfloat16 convolution or matmul kernel, that is a float32 copy of every
bfloat16 weight, held for the whole loop (3.4 GiB for SD 1.5's U-Net). `per_step_params` ties the parameters to
the loop's state so that each weight is converted where it is used; with the scheduler above, a two-step loop of
the bfloat16 U-Net keeps 0.31 GiB of temporaries instead of 3.45.

XLA's compiler frees what it allocated when a compile ends, but the C allocator keeps those pages: compiling SD
1.5's U-Net step left the process 0.5 GiB larger, on top of the weights, for the rest of its life. A function
from `inference_jit` therefore calls `release_compiler_memory()` (glibc's `malloc_trim(0)`, which hands the free
pages back to the system) after a call when XLA compiled a program since the last release, as JAX's monitoring
events report it; the peak of loading, compiling and running that step fell from 4.23 to 3.95 GiB.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any, Callable

import jax

CPU_INFERENCE_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def inference_options() -> dict[str, Any] | None:
    """The XLA options of inference programs on the default backend (None: XLA's defaults)."""
    return dict(CPU_INFERENCE_OPTIONS) if jax.default_backend() == "cpu" else None


# JAX's monitoring event for one backend compile (a persistent-cache hit records none).
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_compiled_since_release = False


def _note_compile(event: str, duration: float, **kwargs: Any) -> None:
    global _compiled_since_release
    if event == BACKEND_COMPILE_EVENT:
        _compiled_since_release = True


jax.monitoring.register_event_duration_secs_listener(_note_compile)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, or None where the C library has none (macOS, musl)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return None


def release_compiler_memory() -> bool:
    """Hand the C heap's free pages back to the system (`malloc_trim(0)`); False where the C library cannot."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


class InferenceFunction:
    """A jitted function that releases the compiler's freed memory after a call when XLA compiled since the last
    release (see the module docstring); everything else (`lower`, `eval_shape`, ...) is the jitted function's."""

    def __init__(self, jitted: Callable):
        self._jitted = jitted

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        global _compiled_since_release
        out = self._jitted(*args, **kwargs)
        if _compiled_since_release:
            _compiled_since_release = False
            release_compiler_memory()
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._jitted, name)


def inference_jit(fn: Callable, **jit_kwargs) -> InferenceFunction:
    """`jax.jit(fn, **jit_kwargs)` compiled with `inference_options()`, releasing the compiler's freed memory after
    calls that compiled."""
    return InferenceFunction(jax.jit(fn, compiler_options=inference_options(), **jit_kwargs))


def per_step_params(params: Any, state: jax.Array) -> Any:
    """`params` as a loop body over `state` should use them: on the CPU backend passed with `state` through an
    optimization barrier, so XLA computes nothing from them outside the loop (see the module docstring); on other
    backends unchanged. The values are the same."""
    if jax.default_backend() != "cpu":
        return params
    return jax.lax.optimization_barrier((params, state))[0]
