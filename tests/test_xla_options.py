"""`jaxdiff.xla_options`: inference programs compile with XLA:CPU's memory-optimised scheduler, and loops take
their parameters through `per_step_params`; both keep fewer temporaries alive and leave the outputs bitwise
unchanged; a call that compiled releases the compiler's freed memory."""

import ast
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jaxdiff
from jaxdiff import xla_options
from jaxdiff.models.autoencoder import autoencoder_config, create_autoencoder
from jaxdiff.xla_options import CPU_INFERENCE_OPTIONS, inference_jit, inference_options, per_step_params

TINY_DECODER = {"block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4, "latent_channels": 4,
                "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2}  # fmt: skip


def test_cpu_inference_options_are_the_memory_optimised_scheduler():
    assert jax.default_backend() == "cpu"
    assert inference_options() == {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
    assert inference_options() is not CPU_INFERENCE_OPTIONS  # a copy: callers cannot change the module's table


def test_a_decoder_keeps_fewer_temporaries_and_gives_the_same_bits():
    vae = create_autoencoder(autoencoder_config(TINY_DECODER))
    latents = jnp.asarray(np.random.default_rng(0).standard_normal((1, 32, 32, 4)), jnp.float32)
    params = vae.init(jax.random.PRNGKey(0), latents, method="decode")["params"]
    decode = lambda p, z: vae.apply({"params": p}, z, method="decode")  # noqa: E731
    default, ours = (jit(decode).lower(params, latents).compile() for jit in (jax.jit, inference_jit))
    # The 32² attention of the mid block and the 64² activations: XLA's default schedule holds 4,587,688 bytes of
    # temporaries at its peak, the memory-optimised one 4,522,088 (JAX 0.10.2 and 0.12.1).
    assert ours.memory_analysis().temp_size_in_bytes < default.memory_analysis().temp_size_in_bytes
    np.testing.assert_array_equal(np.asarray(ours(params, latents)), np.asarray(default(params, latents)))


def test_the_inference_rooms_compile_through_inference_jit():
    """Every program of the pipelines (`jaxdiff.latent`, `jaxdiff.sampling`) and of the sharded forwards is
    compiled by `inference_jit`: none calls `jax.jit` itself."""
    root = pathlib.Path(jaxdiff.__file__).parent
    files = [*(root / "latent").glob("*.py"), *(root / "sampling").glob("*.py"), root / "models" / "param_sharding.py"]
    direct = [f"{path.relative_to(root)}:{node.lineno}"
              for path in files for node in ast.walk(ast.parse(path.read_text()))
              if isinstance(node, ast.Attribute) and node.attr == "jit" and getattr(node.value, "id", None) == "jax"]
    assert direct == []


def _conv_loop(tie: bool):
    """Three steps of six 3×3 convolutions whose bfloat16 kernels are converted to float32 where they are used."""

    def run(kernels, x):
        def body(x, _):
            for kernel in per_step_params(kernels, x) if tie else kernels:
                x = jnp.tanh(jax.lax.conv_general_dilated(x, kernel.astype(jnp.float32), (1, 1), "SAME",
                                                          dimension_numbers=("NHWC", "HWIO", "NHWC")))  # fmt: skip
            return x, None

        return jax.lax.scan(body, x, None, length=3)[0]

    return run


def test_a_loop_over_bfloat16_weights_converts_each_where_it_is_used():
    rng = np.random.default_rng(0)
    kernels = [jnp.asarray(0.05 * rng.standard_normal((3, 3, 64, 64)), jnp.bfloat16) for _ in range(6)]
    x = jnp.asarray(rng.standard_normal((1, 8, 8, 64)), jnp.float32)
    hoisted, tied = (inference_jit(_conv_loop(tie)).lower(kernels, x).compile() for tie in (False, True))
    one_kernel = 3 * 3 * 64 * 64 * 4  # float32 bytes of one converted kernel
    # XLA hoists the six converts out of the loop and holds their float32 copies through it (901,188 bytes of
    # temporaries); tied to the loop's state, one converted kernel is alive at a time (163,908).
    assert hoisted.memory_analysis().temp_size_in_bytes >= 6 * one_kernel
    assert tied.memory_analysis().temp_size_in_bytes < 2 * one_kernel
    np.testing.assert_array_equal(np.asarray(tied(kernels, x)), np.asarray(hoisted(kernels, x)))
    assert per_step_params(kernels, x)[0] is not kernels[0]  # passed through the barrier on the CPU backend
    np.testing.assert_array_equal(np.asarray(per_step_params(kernels, x)[0]), np.asarray(kernels[0]))


def test_a_call_that_compiles_releases_the_compilers_memory(monkeypatch):
    """After a call, if XLA compiled since the last release, and only then, `release_compiler_memory` runs; the
    function is otherwise the jitted one (its outputs, its `lower`)."""
    released = []
    monkeypatch.setattr(xla_options, "release_compiler_memory", lambda: released.append(True))
    triple = inference_jit(lambda x: 3 * x + 1)
    x, y, z = jnp.arange(5.0), jnp.arange(5.0) + 1, jnp.arange(6.0)
    np.testing.assert_array_equal(triple(x), 3 * np.arange(5.0) + 1)
    assert released == [True]
    triple(y)  # the same shapes: nothing compiled
    assert released == [True]
    triple(z)  # a new shape compiles
    assert released == [True, True]
    assert "stablehlo.multiply" in triple.lower(x).as_text()
    monkeypatch.undo()
    assert xla_options.release_compiler_memory() is (sys.platform == "linux")  # glibc's malloc_trim on Linux
