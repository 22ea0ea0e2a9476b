"""Denoising networks: the DDPM U-Net, score_sde's NCSN++/DDPM++, EDM's SongUNet, and size/cost summaries."""

_EXPORTS = {  # name -> the submodule defining it
    "timestep_embedding": "layers",
    "NETWORKS": "networks", "create_model": "networks", "example_inputs": "networks",
    "count_parameters": "summary", "model_summary": "summary",
    "UNet": "unet",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    # Each name is imported from its module on first use, so that importing one submodule of this package
    # does not import all of them; code inside jaxdiff imports from the submodules themselves.
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
