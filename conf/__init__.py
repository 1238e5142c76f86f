"""Hydra configs, shipped inside the package (sdtrain.conf) so a non-editable install has them."""
