"""LightningDataModules that feed sdtrain."""
