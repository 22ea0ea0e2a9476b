"""What a training run trains: the diffusion model (`diffusion`), the autoencoder (`autoencoder`), text-conditioned
latent diffusion (`latent`), class-conditional latent diffusion (`class_latent`: DiT / SiT on ImageNet-style data) or
LoRA adapters of an SD3 / Flux transformer (`flow_lora`), one module each, with the `Task` protocol (`base`).

`jaxdiff.training.loop` drives any `Task` through the same loop (lock, resume, data order, checkpoints,
metrics, progress, signals, sample grids); `jaxdiff.training.runs.make_task(config, source)` picks the one
`config.task` names.
"""
