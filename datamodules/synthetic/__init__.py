"""Synthetic copy-detection sets (paper Table 1): the builder base, Segmix with its masks,
Cutmix and diffusion outpainting (Patch, Diagonal)."""
