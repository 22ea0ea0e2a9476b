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
"""

from __future__ import annotations

from typing import Any, Callable

import jax

CPU_INFERENCE_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def inference_options() -> dict[str, Any] | None:
    """The XLA options of inference programs on the default backend (None: XLA's defaults)."""
    return dict(CPU_INFERENCE_OPTIONS) if jax.default_backend() == "cpu" else None


def inference_jit(fn: Callable, **jit_kwargs) -> Callable:
    """`jax.jit(fn, **jit_kwargs)` compiled with `inference_options()`."""
    return jax.jit(fn, compiler_options=inference_options(), **jit_kwargs)


def per_step_params(params: Any, state: jax.Array) -> Any:
    """`params` as a loop body over `state` should use them: on the CPU backend passed with `state` through an
    optimization barrier, so XLA computes nothing from them outside the loop (see the module docstring); on other
    backends unchanged. The values are the same."""
    if jax.default_backend() != "cpu":
        return params
    return jax.lax.optimization_barrier((params, state))[0]
