"""jaxdiff: diffusion models in JAX/Flax — DDPM, score SDEs and EDM, latent text-to-image (Stable Diffusion).

Families: the discrete DDPM process (`jaxdiff.schedule`, `jaxdiff.diffusion`), continuous processes — VE, VP,
sub-VP SDEs and EDM — seen through EDM's denoiser D(x; σ) (`jaxdiff.processes`, `jaxdiff.diffusion.continuous`),
and latent diffusion with text conditioning (`jaxdiff.latent`). `jaxdiff.families` holds one object per pixel-space
family that training, sampling and evaluation ask instead of branching on the kind.

Rooms, from the bottom up; each imports only from those below it:
  errors, checks                the user-error hierarchy and the shared input checks
  schedule, processes           beta schedules (Schedule) and continuous processes (α(t), σ(t))
  images, sharding              image conversions; device meshes and shardings
  xla_options                   the XLA options jaxdiff's inference programs compile with
  weights/                      reading foreign weight files: safetensors, PyTorch pickles (no code run), name matching
  diffusion/                    the math: DDPM q / posterior / VLB, D(x; σ) adapters, guidance, losses
  models/                       networks only
  samplers/                     compiled samplers on ᾱ tables and on σ grids
  families/                     one object per kind of diffusion (discrete, continuous) that the rooms above ask
  latent/                       the latent family's model bundle, scheduler grids, pipeline, tokenizers, SD readers
  config/, data/                run configs and recipes; datasets
  training/                     train state and steps, tasks, the loop, checkpoints
  readers/                      weights of other pixel-space formats -> (config, params)
  sampling/                     Pipeline, `load_weights` of any format, and sharded sampling jobs
  evaluation/                   Inception, FID / IS / PR, bits/dim, ODE likelihood
  convert/                      writing other formats, and the `jaxdiff convert` verb (nothing below imports it)
  cli/                          the `jaxdiff` command
"""

__version__ = "0.1.0"

__all__ = ["Pipeline", "diffusion", "images", "make_schedule", "samplers", "schedule"]


def __getattr__(name):
    # Imported on first use so that `import jaxdiff.config` stays light.
    import importlib

    if name == "Pipeline":
        from jaxdiff.sampling.pipeline import Pipeline

        return Pipeline
    if name == "make_schedule":
        from jaxdiff.schedule import make_schedule

        return make_schedule
    if name in ("diffusion", "images", "samplers", "schedule"):
        return importlib.import_module(f"jaxdiff.{name}")
    raise AttributeError(f"module 'jaxdiff' has no attribute {name!r}")
