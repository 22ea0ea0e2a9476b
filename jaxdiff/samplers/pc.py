"""Predictor–corrector samplers of the reverse SDE (Song et al. 2021), one `lax.scan` over a time grid.

The state is the process state x_t, from x_T ~ prior at t_max; step i goes from t = grid[i] to
s = grid[i+1] on `time_grid` (steps + 1 evenly spaced times down to t_min): n_corrector corrector
steps at t, then one predictor step to s. With r = α_t/α_s and G² = α_t²·((σ/α)_t² − (σ/α)_s²) (the
forward transition x_t = r·x_s + G·z):
  euler_maruyama     x ← x + (f(x, t) − g(t)²·score)·(s − t) + g(t)·sqrt(t − s)·z;
  reverse_diffusion  x ← x − (r − 1)·x + G²·score + G·z  (score_sde's reverse discretization);
  ancestral          x ← (x + G²·score)/r + (σ_s/σ_t)·G·z: the exact Gaussian posterior q(x_s | x_t, x̂_0)
                     (its variance is score_sde's for VE; score_sde's VP uses G² = β instead);
  langevin           ε = 2·a·(snr·‖z‖/‖score‖)² (norms averaged over the batch), a = r²
                     (1 − β_i for VP, 1 for VE, as score_sde); x ← x + ε·score + sqrt(2ε)·z;
  ald                as langevin with ε = 2·a·(snr·σ_t)².
The grid is uniform in t, as score_sde's: on the edm process (t = σ) it leaves few steps at low noise,
where EDM's samplers belong. The last predictor step's mean x_{t_min} is denoised, x̂_0 = D(x/α; σ/α) at t_min: steps·(n_corrector + 1)
+ 1 evaluations. Noise of step i: predictor sub-step 0, corrector j sub-step j + 1 (see `grids.step_noise`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdiff.diffusion.denoisers import denoise_state, score_from_denoiser
from jaxdiff.samplers.grids import step_noise, time_grid

PREDICTORS = ("euler_maruyama", "reverse_diffusion", "ancestral")
CORRECTORS = ("langevin", "ald", "none")


def pc_sample(denoiser, process, x_T, noise_key, steps, *, predictor, corrector="none", snr=0.16, n_corrector=1):
    """Returns (x̂_0, nfe) from x_T; see the module docstring for each predictor and corrector."""
    grid = time_grid(process, steps)
    n_correct = 0 if corrector == "none" else n_corrector

    def score(x, t):
        return score_from_denoiser(denoiser, process, x, t)

    def correct(x, t, s, i, j):
        z = step_noise(noise_key, i, x, j + 1)
        grad = score(x, t)
        a = (process.alpha(t) / process.alpha(s)) ** 2
        if corrector == "langevin":
            ratio = jnp.mean(_norms(z)) / jnp.mean(_norms(grad))
            size = 2.0 * a * (snr * ratio) ** 2
        else:
            size = 2.0 * a * (snr * process.sigma(t)) ** 2
        return x + size * grad + jnp.sqrt(2.0 * size) * z

    def predict(x, t, s, i):
        """(the next state, its noise-free mean)."""
        z = step_noise(noise_key, i, x)
        if predictor == "euler_maruyama":
            dt = s - t
            g = process.diffusion(t)
            mean = x + (process.drift(x, t) - g**2 * score(x, t)) * dt
            return mean + g * jnp.sqrt(-dt) * z, mean
        r = process.alpha(t) / process.alpha(s)
        g2 = process.alpha(t) ** 2 * (process.noise_level(t) ** 2 - process.noise_level(s) ** 2)
        if predictor == "reverse_diffusion":
            mean = x - (r - 1.0) * x + g2 * score(x, t)
            return mean + jnp.sqrt(g2) * z, mean
        mean = (x + g2 * score(x, t)) / r
        return mean + process.sigma(s) / process.sigma(t) * jnp.sqrt(g2) * z, mean

    def body(carry, row):
        x, _ = carry
        t, s, i = row["t"], row["s"], row["i"]
        for j in range(n_correct):
            x = correct(x, t, s, i, j)
        return predict(x, t, s, i), None

    rows = {"t": grid[:-1], "s": grid[1:], "i": jnp.arange(steps)}
    (_, mean), _ = jax.lax.scan(body, (x_T, x_T), rows)
    x0 = denoise_state(denoiser, process, mean, grid[-1])
    return x0, steps * (n_correct + 1) + 1


def _norms(v):
    """Per-example Euclidean norms of v [B, ...]: [B]."""
    return jnp.sqrt(jnp.sum(jnp.reshape(v, (v.shape[0], -1)) ** 2, axis=1))
