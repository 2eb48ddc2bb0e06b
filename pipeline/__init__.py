"""archive-restore: GFP-GAN face restoration for photo archives, on Ray."""

__version__ = "0.1.0"
