"""Model size and cost: parameter count and forward FLOPs per image, without allocating parameters."""

from __future__ import annotations

import math
from typing import Any

import jax
import ml_collections

from jaxdiff.models.cpu_conv import xla_convolutions
from jaxdiff.models.layers import whole_attention
from jaxdiff.models.networks import create_model, example_inputs


def count_parameters(params: Any) -> int:
    """Total number of scalars in a params pytree (arrays or `jax.ShapeDtypeStruct` leaves)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params))


def sub_jaxprs(params: dict) -> list:
    """Jaxprs nested in an equation's parameters (jit, custom_jvp, remat, cond branches, ...)."""
    found = []
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            inner = getattr(item, "jaxpr", item)  # ClosedJaxpr -> Jaxpr
            if hasattr(inner, "eqns"):
                found.append(inner)
    return found


def matmul_flops(jaxpr: Any) -> int:
    """FLOPs of every convolution and dot_general in `jaxpr` (a Jaxpr or ClosedJaxpr), multiply-add = 2.

    Convolutions count every kernel tap, zero padding included (the usual convention, and the one
    behind the DDPM paper's 6.222 GMAC); elementwise ops are not counted. A scan's body (`lax.scan`,
    `lax.map`: attention on the CPU backend runs one head at a time) counts once per iteration; a while loop's
    body, whose trip count the jaxpr does not hold, counts once; a `cond` counts its costliest branch.
    """
    total = 0
    for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
        out_size = math.prod(eqn.outvars[0].aval.shape)
        if eqn.primitive.name == "conv_general_dilated":
            kernel = eqn.invars[1].aval.shape
            out_features = kernel[eqn.params["dimension_numbers"].rhs_spec[0]]
            total += 2 * out_size * (math.prod(kernel) // out_features)
        elif eqn.primitive.name == "dot_general":
            (lhs_contracting, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * out_size * math.prod(lhs[d] for d in lhs_contracting)
        inner = [matmul_flops(sub) for sub in sub_jaxprs(eqn.params)]
        if eqn.primitive.name == "cond":  # one branch runs: `lax.platform_dependent`'s CPU and default forms
            total += max(inner, default=0)
        else:
            total += (eqn.params["length"] if eqn.primitive.name == "scan" else 1) * sum(inner)
    return total


def _xla_flops(compiled: jax.stages.Compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per computation
        cost = cost[0]
    return float(cost["flops"])


def parameter_shapes(model_config: ml_collections.ConfigDict) -> Any:
    """The params pytree of the network of `config.model` as `jax.ShapeDtypeStruct`s (`jax.eval_shape` of init)."""
    model = create_model(model_config)
    return jax.eval_shape(model.init, jax.random.key(0), *example_inputs(model_config))["params"]


def model_summary(model_config: ml_collections.ConfigDict) -> dict:
    """Size and forward cost of the network of `config.model` (`model.network`), for one image in eval mode.

    Returns `{"parameters": int, "gflops": float, "xla_gflops": float}`: `gflops` counts every
    convolution and matmul (padding taps included, multiply-add = 2; DDPM CIFAR-10: 12.44);
    `xla_gflops` is XLA's cost analysis of the compiled forward (attention and convolutions traced as
    accelerators run them: `layers.whole_attention`, `cpu_conv.xla_convolutions`), which skips taps that fall on
    zero padding and adds elementwise ops (DDPM CIFAR-10: about 11.7). Parameters come from `jax.eval_shape` of
    init, so nothing is allocated.
    """
    model = create_model(model_config)
    x, labels, y = example_inputs(model_config)
    params = parameter_shapes(model_config)

    def forward(params, x, labels, y):
        return model.apply({"params": params}, x, labels, y)

    with whole_attention(), xla_convolutions():  # not the CPU's loops and GEMMs: accelerators' programs
        return {
            "parameters": count_parameters(params),
            "gflops": matmul_flops(jax.make_jaxpr(forward)(params, x, labels, y)) / 1e9,
            "xla_gflops": _xla_flops(jax.jit(forward).lower(params, x, labels, y).compile()) / 1e9,
        }
