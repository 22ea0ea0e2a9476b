"""Reading foreign weight files, whatever the model: diffusers-style folders' JSON and safetensors (`files`,
`safetensors_reader`), PyTorch tensor files without running pickle code (`torch_pickle`), pairing our parameters
with a file's tensors (`matching`), PyTorch layouts (`torch_layout`) and LoRA files (`lora_files`). The readers of
each format build on these: `jaxdiff.latent` (Stable Diffusion), `jaxdiff.readers` (pixel-space formats),
`jaxdiff.evaluation` (Inception)."""
