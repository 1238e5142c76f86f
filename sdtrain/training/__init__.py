"""The LightningModule and what its step uses: diffusion maths, per-step draws, EMA, the non-finite
guard, encoding, the global batch, FSDP sharding, the validation loss, the skip tally."""
