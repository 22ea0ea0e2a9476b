"""Reading weights of other pixel-space formats into a run config and params: official DDPM TF checkpoints,
diffusers UNet2DModel / DDPMPipeline / DDIMPipeline and ScoreSdeVePipeline folders, score_sde checkpoints and EDM
snapshots. Runtime code (`Pipeline.from_pretrained`) and `jaxdiff.convert` both read through here; Stable
Diffusion's readers live with their family (`jaxdiff.latent.stable_diffusion`).

    config, ema_params = load_weights(path)  # any format, `jaxdiff.sampling.pipeline` (workdirs included)

Formats: "tf" (a checkpoint prefix with a `.index` file, or a folder holding one), "diffusers"
(a folder with `config.json` and `*.safetensors`, or a pipeline folder with them in `unet/` and the
scheduler config, which sets the diffusion, in `scheduler/`),
"jaxdiff" (a `jaxdiff train` workdir, i.e. a folder with `checkpoints/`), "score_sde" (a `checkpoint_<N>`
msgpack file, or a folder holding them, itself or in `checkpoints/` or `checkpoints-meta/`; its training
config is named by `dataset`), "edm" (a `network-snapshot-*.pkl`; any pickle with `source_format="edm"`),
"score_sde_ve" (a diffusers folder whose `model_index.json` names ScoreSdeVePipeline). The last three
become continuous-time jaxdiff configs (`continuous_configs`). "dit" (an original DiT `.pt`/`.pth`,
`dit_checkpoint`) and "dit_pipeline" (a diffusers DiTPipeline folder, `dit_pipeline`) are latent-space models that
`Pipeline.from_pretrained` reads whole (with a VAE folder for a `.pt`); `load_weights` and convert refuse them.

`jaxdiff.readers.formats` holds `detect_format` and the checks of a format; each reader lives in its own module.
`load_weights` sits in `jaxdiff.sampling.pipeline`, above the training room whose workdirs it also reads.
`workdir_pipelines` reads the runs of the latent, flow_lora and class_latent tasks into the pipelines that sample them.
"""
