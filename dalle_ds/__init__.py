"""dalle_ds: a DeepSpeed-backed implementation of "Zero-Shot Text-to-Image Generation" (Ramesh et al., 2021)."""

__version__ = "0.1.0"
