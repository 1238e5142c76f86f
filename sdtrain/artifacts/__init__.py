"""What persists: the checkpoint schema and atomic checkpoint files, export (diffusers folder, single
file, LoRA), the latent cache, the shard writer, sampling to images."""
