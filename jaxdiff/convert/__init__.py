"""Converting weights between formats, for the `jaxdiff convert` verb: any format `jaxdiff.readers` reads into a
jaxdiff workdir, and a jaxdiff workdir out as a diffusers DDPMPipeline or ScoreSdeVePipeline folder; Stable
Diffusion models out as a diffusers folder; a LoRA run's adapters out as a diffusers LoRA file. Reading lives below
(`jaxdiff.readers`, `jaxdiff.latent`), so no runtime module imports this package.

    convert("model.ckpt-790000", "runs/ddpm_cifar10")                  # official TF -> jaxdiff workdir
    convert("ddpm-cifar10-32", "runs/from_hub")                         # diffusers -> jaxdiff workdir
    convert("runs/cifar10", "export/cifar10", target_format="diffusers")  # jaxdiff (EMA) -> DDPMPipeline folder
    convert("runs/ve01", "export/ve01", target_format="diffusers")        # uncentred VE NCSN++ -> ScoreSdeVePipeline
    convert("checkpoint_26", "runs/sde", dataset="vp/ddpmpp_continuous")  # score_sde -> jaxdiff workdir
    convert("runs/lora", "export/lora", target_format="diffusers-lora")  # LoRA run -> pytorch_lora_weights.safetensors

`jaxdiff.convert.formats` holds `convert`; `diffusers_export`, `score_sde_ve_export`, `stable_diffusion_export` and
`lora_export` the writers.
"""
