"""Helpers every glimpse script shares: one module per concern.

config      typed dataclass configs from defaults, TOML files and --key=value flags
errors      the one-line error a user sees instead of a traceback
checkpoint  saving and loading ckpt.pt and best.pt, rebuilding a model, the random streams a resume restores
run_folder  which out_dir a run may start in, and what a resume must match
optim       AdamW, Muon beside AdamW, and the learning-rate schedule
runtime     device, dtype, autocast, the GPU's peak, and stopping on signals
distributed torchrun's processes: rank and world size, collectives, the process group, one error for all
tracking    metrics.jsonl and wandb logging
attention   attention dumps and head metrics
induction   the induction probe: which heads copy what followed an earlier occurrence
mechanism   a text traced through the model: queries, keys, values, scores, what each head moved, logit attribution
notebook    the Python API for notebooks: load a model, run a text, get the arrays, show the viewer inline
ablation    removing heads, and ranking every head by what its removal costs
render      heatmap PNGs, and the colours the viewer shares with them
viewer      the HTML viewer (viewer.html) with a dump packed inside, and the snapshots' slider
evaluation  scoring a model on a whole split, in windows of a given length
positions   the position encodings that are functions: sinusoidal, rotary, ALiBi's slopes
generation  the KV cache, a generated step, and sampling the next token
"""
