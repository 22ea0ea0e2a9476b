"""The latent / text-to-image family: Stable Diffusion's model bundle, its pipeline, the diffusers scheduler
grids its samplers step on, and its tokenizers.

- `bundle`: `LatentModels` (U-Net, autoencoder, text encoder, tokenizer, their configs and parameters) and
  `SchedulerSettings` (the training schedule and the step placement a diffusers scheduler config asks for).
- `schedulers`: which training steps or noise levels a run visits and how each sampler steps through them;
  `scheduler_run`: one such run (start state and compiled loop) around a U-Net.
- `pipeline`: `LatentPipeline`: text_to_image, image_to_image, inpaint (SD 1.x / 2.x and SDXL).
- `prompt_conditioning`: prompts -> the U-Net's conditioning (context, SDXL's added conditioning and time ids).
- `sdxl`: reading SDXL base and refiner folders.
- `upscale`: `UpscalePipeline`, the x4 upscaler (StableDiffusionUpscalePipeline folders): upscale.
- `tiled_decode`: decoding latents tile by tile with blended seams (diffusers' `AutoencoderKL.tiled_decode`).
- `lora`: LoRA adapters on its U-Net or transformer and text encoders (load, scale, fuse, unfuse).
- `clip_tokenizer`, `word_tokenizer`: CLIP's BPE tokenizer (from a folder's files) and the word-level tokenizer
  of models trained here.
- `t5_weights`, `t5_tokenizer`: a transformers `T5EncoderModel` folder (SD3's and Flux's T5 text encoder, sharded
  or not) read into `models.t5_encoder`'s parameters, and T5's SentencePiece tokenizer.
- `mmdit_weights`, `flux_weights`: diffusers SD3 / Flux transformer folders read into `models.mmdit` / `models.flux`;
  `transformer_single_file`: their original single-file releases (BFL's and Stability's layouts).
- `flow_scheduler`: FlowMatchEulerDiscreteScheduler's settings and σ grid; `flow_pipeline`: `FlowPipeline`, the
  flow-matching Euler loop and folder reading SD3 and Flux share; `sd3`: `SD3Pipeline` (three text encoders);
  `flux_pipeline`: `FluxPipeline` (CLIP + T5, 2×2 packed latents, distilled guidance).
"""
