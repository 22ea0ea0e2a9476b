"""PNDM (diffusers' PNDMScheduler) on the training steps of a discrete schedule: its pseudo linear multistep method
(PLMS; skip_prk_steps=True, the sampler of Stable Diffusion 1.x's released scheduler and of the original code's
`--plms`), after a pseudo Runge–Kutta warm-up with skip_prk_steps=False.

The state is the VP latent x_t = sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·n at the 0-based training step t. One step from t
to t' with a noise estimate ε is PNDM's transfer (DDIM's η = 0 step, written as the paper does):
  x_{t'} = sqrt(ᾱ_{t'}/ᾱ_t)·x_t − (ᾱ_{t'} − ᾱ_t)·ε / (ᾱ_t·sqrt(1 − ᾱ_{t'}) + sqrt(ᾱ_t·(1 − ᾱ_t)·ᾱ_{t'})),
where a step t' < 0 has the final ᾱ (1 with set_alpha_to_one, else ᾱ_0). A v-predicting model's combined output v
is read as ε = sqrt(ᾱ_t)·v + sqrt(1 − ᾱ_t)·x_t, with the t and x_t the step starts from.

For N inference steps visiting a_0 > a_1 > … > a_{N−1} (decreasing), Δ = T // N and h = Δ // 2; e_k is the output
of model call k at step t_k. PLMS alone (`pndm_calls(..., warm_up=False)`): N + 1 calls, a_1 twice (one call for
N = 1), and step k is
  k = 0:  e_0, from t_0 to t_0 − Δ;
  k = 1:  (e_0 + e_1)/2, from the first state at t_1 + Δ to t_1 (step 0 redone with the averaged slope);
  k = 2:  (3·e_2 − e_0)/2;   k = 3:  (23·e_3 − 16·e_2 + 5·e_0)/12;
  k >= 4: (55·e_k − 59·e_{k−1} + 37·e_{k−2} − 9·e_{k−3})/24 over the outputs kept (all but e_1), from t_k to t_k − Δ.
With the warm-up (N >= 4): three pseudo Runge–Kutta steps from a_j to a_{j+1} (j = 0, 1, 2), each of four calls
at a_j, a_{j+1} + h, a_{j+1} + h, a_{j+1}, all four transfers starting from the state at a_j: with e_j itself to
a_j − h, with the second call's output to a_{j+1} + h, with the third's to a_{j+1}, then with
(e_1st + 2·e_2nd + 2·e_3rd + e_4th)/6 to a_{j+1}; the first call's outputs are kept. Then PLMS's fourth-order step
at a_3, a_4, …, a_{N−1} (N + 9 calls in all).
(Δ is diffusers' arithmetic: a − Δ is the next visited step for "leading" spacing, not always otherwise.) A run
given a later part of the PLMS calls (image-to-image) counts k from its first call, as diffusers' scheduler does.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import UsageError
from jaxdiff.samplers.grids import scan_steps

Array = jax.Array

# The weights of (e_k, then the outputs kept before it, most recent first) in PLMS step k = 0, 1, 2, 3 and >= 4.
PLMS_WEIGHTS = np.array([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [1.5, -0.5, 0.0, 0.0],
                         [23 / 12, -16 / 12, 5 / 12, 0.0], [55 / 24, -59 / 24, 37 / 24, -9 / 24]])  # fmt: skip
PLMS_MEAN_TYPES = ("eps", "v")
WARM_UP_CALLS = 12  # three Runge–Kutta steps of four calls
# Per call of a Runge–Kutta step: (weight of e in the running sum, weight of e in the transfer, weight of the
# running sum in it, whether the transfer ends h before the call's step).
_RK_CALLS = ((1 / 6, 1.0, 0.0, True), (1 / 3, 1.0, 0.0, False), (1 / 3, 1.0, 0.0, True), (0.0, 1 / 6, 1.0, False))


def pndm_calls(visited: np.ndarray, *, warm_up: bool, half: int = 0) -> np.ndarray:
    """The training steps of the model calls, int64, as diffusers' `timesteps`, for the decreasing visited steps
    [N]: PLMS alone [N + 1] (the second visited step repeated, N >= 2); with the warm-up (N >= 4) the Runge–Kutta
    calls (module docstring; `half` = h) then visited[3:], [N + 9]."""
    v = np.asarray(visited, np.int64)
    if not warm_up:
        return np.concatenate([v[:2], v[1:]]) if len(v) > 1 else v.copy()
    rk = [v[0]] + [s for j in (1, 2, 3) for s in (v[j] + half, v[j] + half, v[j], v[j])][:-1]
    return np.concatenate([np.asarray(rk, np.int64), v[3:]])


def pndm_table(calls: np.ndarray, stride: int, alphas_cumprod: np.ndarray, final_alpha_bar: float, *,
               warm_up: bool) -> dict:  # fmt: skip
    """The rows of `pndm_steps` for the model calls at training steps `calls` [n] (from `pndm_calls`, or a last
    part of its PLMS calls), Δ = `stride` and the training ᾱ [T] (float64): float32 arrays [n, ...]:
      w          [n, 4] the transfer's weights of (e_k, the kept outputs, most recent first);
      w_sum      the transfer's weight of the Runge–Kutta running sum s (before this call's update);
      sum_keep, sum_add   s ← sum_keep·s + sum_add·e_k;
      keep       1 where e_k is kept;   save: 1 where the state is saved before the step;
      restart    1 where the step starts from the saved state (else from the current one);
      sqrt_alpha, sqrt_one_minus   sqrt(ᾱ_t), sqrt(1 − ᾱ_t) of the step's start t (v-prediction);
      c_x, c_e   the transfer x_{t'} = c_x·x_t − c_e·ε.
    A UsageError names a step outside 0..T−1."""
    alphas_cumprod = np.asarray(alphas_cumprod, np.float64)
    calls, half, rows = np.asarray(calls, np.int64), stride // 2, []
    for c, t in enumerate(calls):
        if warm_up and c < WARM_UP_CALLS:
            sum_add, w, w_sum, to_half = _RK_CALLS[c % 4]
            row = dict(w=[w, 0, 0, 0], w_sum=w_sum, sum_keep=float(c % 4 != 3 and c % 4 != 0), sum_add=sum_add,
                       keep=c % 4 == 0, save=c % 4 == 0, restart=True, start=calls[c - c % 4],
                       end=t - half if to_half else t)  # fmt: skip
        else:
            k = c - WARM_UP_CALLS + 4 if warm_up else c
            row = dict(w=PLMS_WEIGHTS[min(k, 4)], w_sum=0.0, sum_keep=0.0, sum_add=0.0, keep=k != 1, save=k == 0,
                       restart=k <= 1, start=t + stride if k == 1 else t, end=t if k == 1 else t - stride)  # fmt: skip
        rows.append(row)
    start, end = np.array([r.pop("start") for r in rows]), np.array([r.pop("end") for r in rows])
    if np.any(start >= len(alphas_cumprod)) or np.any(calls < 0):
        raise UsageError(f"PNDM steps {calls.tolist()} with stride {stride} leave the training steps "
                         f"0..{len(alphas_cumprod) - 1}")  # fmt: skip
    alpha = alphas_cumprod[start]
    alpha_next = np.where(end >= 0, alphas_cumprod[np.maximum(end, 0)], final_alpha_bar)
    denominator = alpha * np.sqrt(1.0 - alpha_next) + np.sqrt(alpha * (1.0 - alpha) * alpha_next)
    table = {name: np.array([r[name] for r in rows], np.float64) for name in rows[0]}
    table.update(sqrt_alpha=np.sqrt(alpha), sqrt_one_minus=np.sqrt(1.0 - alpha), c_x=np.sqrt(alpha_next / alpha),
                 c_e=(alpha_next - alpha) / denominator)  # fmt: skip
    return {name: np.asarray(value, np.float32) for name, value in table.items()}


def pndm_steps(model_fn: Callable[[Array, Array], Array], x_start: Array, rows: dict, *, mean_type: str) -> Array:
    """PNDM (module docstring) from the VP latents x_start [B, ...] at the first call's step through the calls of
    `rows` (`pndm_table`) in one `lax.scan`: model_fn(x, k) is the model's ε or v (`mean_type` "eps" or "v") at
    call k (int32 [B]; the caller maps k to its training step). Returns x at the last step's end, float32."""
    if mean_type not in PLMS_MEAN_TYPES:
        raise UsageError(f"mean_type={mean_type!r}: PNDM reads the model as {' or '.join(PLMS_MEAN_TYPES)} only")

    def step(carry, row):
        x, saved, running, kept = carry  # kept [3, B, ...]: the outputs kept before this call, most recent first
        output = jnp.asarray(model_fn(x, jnp.full((x.shape[0],), row["i"], jnp.int32)), jnp.float32)
        combined = row["w"][0] * output + jnp.tensordot(row["w"][1:], kept, axes=1) + row["w_sum"] * running
        running = row["sum_keep"] * running + row["sum_add"] * output
        kept = jnp.where(row["keep"] > 0, jnp.concatenate([output[None], kept[:-1]]), kept)
        saved = jnp.where(row["save"] > 0, x, saved)
        base = jnp.where(row["restart"] > 0, saved, x)
        eps = combined if mean_type == "eps" else row["sqrt_alpha"] * combined + row["sqrt_one_minus"] * base
        return row["c_x"] * base - row["c_e"] * eps, saved, running, kept

    rows = {name: jnp.asarray(value) for name, value in rows.items()}
    zeros = jnp.zeros_like(x_start)
    (x, *_), _ = scan_steps(step, (x_start, x_start, zeros, jnp.zeros((3, *x_start.shape), jnp.float32)), rows)
    return x
