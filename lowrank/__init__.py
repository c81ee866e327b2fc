"""lowrank: importance-weighted low-rank compression of fine-tuned Transformer encoders."""

__version__ = "0.1.0"
