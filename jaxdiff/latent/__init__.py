"""The latent / text-to-image family: Stable Diffusion's model bundle, its pipeline, the diffusers scheduler
grids its samplers step on, and its tokenizers.

- `bundle`: `LatentModels` (U-Net, autoencoder, text encoder, tokenizer, their configs and parameters) and
  `SchedulerSettings` (the training schedule and the step placement a diffusers scheduler config asks for).
- `schedulers`: which training steps or noise levels a run visits and how each sampler steps through them.
- `pipeline`: `LatentPipeline`: text_to_image, image_to_image, inpaint.
- `clip_tokenizer`, `word_tokenizer`: CLIP's BPE tokenizer (from a folder's files) and the word-level tokenizer
  of models trained here.
"""
