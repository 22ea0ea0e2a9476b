"""Training: the state and its jitted step, the loop that runs it in a workdir, and what a workdir holds.

- `step`: `TrainState` (params, EMA, optimizer state), the optimizer, the guarded update every step ends with.
- `diffusion_step`: the diffusion model's loss and step (the config's family).
- `latent_step`, `autoencoder_step`: the steps of the latent family (text-conditioned U-Net on frozen
  autoencoder latents) and of the autoencoder itself.
- `tasks`: the `Task` protocol the loop drives (diffusion, autoencoder, latent).
- `loop`: `train_and_evaluate(config, workdir)`: data, sharding, steps, checkpoints, sample grids, logs.
- `checkpoint`, `workdir_lock`, `stop_signals`, `metrics_log`: orbax checkpoints of a workdir, the one-writer
  lock, SIGTERM/SIGINT handling, the scalar log writer.
"""
