"""Using a model: start from pretrained weights, export to timm, embed slides and tiles, evaluate."""
