"""Helpers every glimpse script shares: one module per concern.

config      typed dataclass configs from defaults, TOML files and --key=value flags
errors      the one-line error a user sees instead of a traceback
checkpoint  saving, loading and rebuilding a model from ckpt.pt
runtime     device, dtype, autocast and DDP process-group setup
tracking    metrics.jsonl and wandb logging
"""
