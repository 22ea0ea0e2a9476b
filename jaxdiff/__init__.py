"""jaxdiff: denoising diffusion models in JAX/Flax.

Modules: `schedule` (beta schedules -> Schedule pytree), `diffusion` (the math as
pure functions), `samplers` (lax.scan samplers), `models` (the DDPM U-Net),
`train` / `training_run` (training), `pipeline` (`Pipeline`: a trained model to
sample from), `evaluation` (FID, IS, bits/dim).
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
