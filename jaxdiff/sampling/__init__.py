"""Sampling from trained models: `Pipeline` (a model and its parameters as one object) and resumable jobs that
write samples in shards."""
