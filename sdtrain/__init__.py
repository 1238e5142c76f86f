"""sdtrain: distributed Stable Diffusion training (Hydra + Lightning + WebDataset + diffusers)."""

__version__ = "0.1.0"
