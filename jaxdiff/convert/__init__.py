"""Weights in other formats: official DDPM TF checkpoints and diffusers UNet2DModel / DDPMPipeline / DDIMPipeline
folders, in and out; score_sde checkpoints and EDM snapshots, in; diffusers ScoreSdeVePipeline folders, in and out.

    convert("model.ckpt-790000", "runs/ddpm_cifar10")                  # official TF -> jaxdiff workdir
    convert("ddpm-cifar10-32", "runs/from_hub")                         # diffusers -> jaxdiff workdir
    convert("runs/cifar10", "export/cifar10", target_format="diffusers")  # jaxdiff (EMA) -> DDPMPipeline folder
    convert("runs/ve01", "export/ve01", target_format="diffusers")        # uncentred VE NCSN++ -> ScoreSdeVePipeline
    convert("checkpoint_26", "runs/sde", dataset="vp/ddpmpp_continuous")  # score_sde -> jaxdiff workdir
    config, ema_params = load_weights(path)                              # any format, for sampling

Formats: "tf" (a checkpoint prefix with a `.index` file, or a folder holding one), "diffusers"
(a folder with `config.json` and `*.safetensors`, or a pipeline folder with them in `unet/` and the
scheduler config, which sets the diffusion, in `scheduler/`),
"jaxdiff" (a `jaxdiff train` workdir, i.e. a folder with `checkpoints/`), "score_sde" (a `checkpoint_<N>`
msgpack file, or a folder holding them, itself or in `checkpoints/` or `checkpoints-meta/`; its training
config is named by `dataset`), "edm" (a `network-snapshot-*.pkl`; any pickle with `source_format="edm"`),
"score_sde_ve" (a diffusers folder whose `model_index.json` names ScoreSdeVePipeline). The last three
become continuous-time jaxdiff configs (`continuous_configs`).


`jaxdiff.convert.formats` holds `detect_format`, `load_weights` and `convert`; each reader lives in its own module.
"""
