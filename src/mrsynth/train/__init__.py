"""Training: presets and overrides, the one trainer loop, checkpoints, logging, loading runs."""
