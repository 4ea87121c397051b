"""
The optimizers and the learning-rate schedule.

Two optimizers, chosen by optimizer=:
  adamw  AdamW for every parameter, with weight decay on matrices only (not on biases and norm
         gains).
  muon   Muon for the matrices inside the blocks (c_attn, c_proj, c_fc) and AdamW for the rest.
         Muon replaces each momentum update with the nearest orthogonal matrix (Newton-Schulz
         iterations), so every direction of a matrix moves at a similar rate, not only the few
         that dominate the gradient. MuonWithAdamW steps the two as one optimizer. Muon decays
         its matrices by its own key, muon_weight_decay (each step shrinks them by the step's
         Muon rate times it, as torch's Muon does), and with muon_split_qkv orthogonalises c_attn's
         queries, keys and values as three matrices (Muon, below).

The schedule (get_lr) is a pure function of the step: linear warmup, cosine decay to min_lr, then
flat; under a time budget the decay follows the fraction of the budget spent (or of max_iters taken,
when further along). set_lr applies it to every group, Muon's scaled from its own peak, so both
optimizers warm up and decay together. ramp grows a step's batch or sequence length over the first
steps, in eighths.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Protocol

import torch
import torch.nn as nn
import torch.optim._muon as muon_module

from glimpse.runtime import computes_bfloat16
from model import GPT


class OptimizerSettings(Protocol):
    """The keys of TrainConfig (glimpse/train_config.py) that the optimizers and the schedule read."""

    optimizer: str
    learning_rate: float
    min_lr: float
    warmup_iters: int
    lr_decay_iters: int
    max_iters: int
    weight_decay: float
    beta1: float
    beta2: float
    muon_lr: float
    muon_momentum: float
    muon_ns_steps: int
    muon_weight_decay: float
    muon_split_qkv: bool


def get_lr(it: int, cfg: OptimizerSettings, budget_used: float | None = None) -> float:
    """Linear warmup to learning_rate, cosine decay to min_lr at lr_decay_iters, then flat.

    With a time budget, budget_used (0 -> 1, the fraction of max_time spent) drives the decay instead,
    so that the run reaches min_lr exactly when its time is up, however fast the machine; or the steps taken
    towards max_iters, when they are further along: the run decays fully whichever of the two ends it.
    """
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if budget_used is not None:
        steps = (it - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters)
        progress = min(max(budget_used, steps), 1.0)
    elif it >= cfg.lr_decay_iters:
        return cfg.min_lr
    else:
        progress = (it - cfg.warmup_iters) / (cfg.lr_decay_iters - cfg.warmup_iters)  # 0 -> 1
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def configure_optimizer(model: GPT, cfg: OptimizerSettings,
                        device: torch.device) -> torch.optim.AdamW | MuonWithAdamW:
    """AdamW that decays matrices (weights, embeddings) but not biases and norm gains.

    With optimizer=muon, Muon takes the weights of the Linear layers inside the blocks (c_attn, c_proj,
    c_fc) and AdamW the rest. Muon's orthogonalised update is meant for matrices that map one hidden
    space to another; embeddings (rows looked up one token at a time), the head and vectors are not.
    With muon_split_qkv, each c_attn weight is three such maps, stacked: Muon updates them apart.
    """
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    hidden = []
    if cfg.optimizer == "muon":
        hidden = [m.weight for m in model.transformer.h.modules() if isinstance(m, nn.Linear)]
    hidden_ids = {id(p) for p in hidden}
    rest = [p for p in params if id(p) not in hidden_ids]
    groups = [
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = device.type in ("cuda", "cpu")  # one kernel for the whole update (MPS lacks it on older torch)
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=fused)
    if hidden:
        # "muon": True marks the group whose learning rate set_lr sets from muon_lr
        row_blocks = {}
        if cfg.muon_split_qkv:
            row_blocks = {id(block.attn.c_attn.weight): 3 for block in model.transformer.h}  # queries, keys, values
        # torch orthogonalises in bfloat16, which a CPU without bfloat16 instructions (docs/performance.md), and a
        # GPU before Ampere (V100, T4), only emulate, slowly
        float32_ns = not computes_bfloat16(device)
        muon = Muon([{"params": hidden, "muon": True}], row_blocks, float32_ns, lr=cfg.muon_lr,
                    momentum=cfg.muon_momentum, ns_steps=cfg.muon_ns_steps, weight_decay=cfg.muon_weight_decay)
        optimizer = MuonWithAdamW(muon, optimizer)
    seen = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert len(seen) == len(set(seen)) == len(params), "every parameter must be in exactly one optimizer group"
    return optimizer


class Muon(torch.optim.Muon):
    """torch's Muon, which can also update a matrix as equal blocks of rows, each a matrix of its own.

    row_blocks maps id(parameter) to its number of blocks. c_attn's weight stacks three maps, the
    queries', keys' and values' (3C x C). Orthogonalised as one, they share one orthogonal matrix:
    torch's shape rule keeps its size that of three C x C steps (a rate times sqrt(rows / columns)),
    but the three share it out by the size of their gradients, so one with a small gradient barely
    moves. Cut into blocks, each gets torch's own update rule (momentum, Newton-Schulz, decay, a rate
    adjusted to its shape) as if it were a C x C parameter.
    The blocks are views of the parameter, its gradient and its one momentum buffer, so the state,
    a checkpoint and a gradient scaler see the whole parameter either way.
    """

    def __init__(self, params, row_blocks: dict[int, int], float32_ns: bool = False, **settings):
        super().__init__(params, **settings)
        self.row_blocks, self.float32_ns = row_blocks, float32_ns

    def step(self, closure=None):
        if not self.float32_ns:
            return super().step(closure)
        # torch's Newton-Schulz casts to bfloat16 inside and has no setting for it: its step is run with the same
        # iteration in float32 in its place (torch.optim._muon calls it by its module-level name)
        original = muon_module._zeropower_via_newtonschulz
        muon_module._zeropower_via_newtonschulz = newton_schulz_float32
        try:
            return super().step(closure)
        finally:
            muon_module._zeropower_via_newtonschulz = original

    def _init_group(self, group, params_with_grad, grads, muon_momentum_bufs):
        # torch's step gathers a group's tensors here, then updates each in turn by its own shape; Muon has no
        # public hook for this, and this private one has kept its signature from PyTorch 2.9 to 2.13
        has_complex = super()._init_group(group, params_with_grad, grads, muon_momentum_bufs)
        blocks = [self.row_blocks.get(id(p), 1) for p in params_with_grad]
        for tensors in (params_with_grad, grads, muon_momentum_bufs):
            tensors[:] = [part for t, n in zip(tensors, blocks) for part in ((t,) if n == 1 else t.chunk(n))]
        return has_complex


def newton_schulz_float32(grad: torch.Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int,
                          eps: float) -> torch.Tensor:
    """torch.optim.Muon's orthogonalisation (its quintic Newton-Schulz iteration, its coefficients), in float32:
    X / |X|, then X <- a X + (b G + c G^2) X with G = X X^T, ns_steps times, on the wide orientation of X."""
    a, b, c = ns_coefficients
    x = grad.float()  # (rows, columns)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T  # G = X X^T is then the smaller of the two Gram matrices
    x = x / x.norm().clamp(min=eps)  # a spectral norm of at most 1, where the iteration converges
    for _ in range(ns_steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


class MuonWithAdamW:
    """Muon and AdamW stepped together, each over its own parameters, as if they were one optimizer.

    param_groups lists both optimizers' groups, so that the learning-rate loop, the gradient scaler and
    the one-group-per-parameter check reach every parameter; state_dict holds both states, so that a
    resumed run continues exactly.
    """

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.AdamW):
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self) -> list[dict]:
        return self.muon.param_groups + self.adamw.param_groups

    def step(self):
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True):
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict):
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


# a group's parameters, and how the optimizer computes, not what: torch's load_state_dict places the state's step
# counts for the kernel choices (on the parameters' device for the fused kernel), so they stay as loaded
KEPT_AS_LOADED = ("params", "fused", "foreach", "capturable", "differentiable")


@contextmanager
def keeping_settings(optimizer: torch.optim.Optimizer | MuonWithAdamW):
    """Inside the block, a saved optimizer state loaded in brings its moments, momentum buffers and step counts,
    not its settings: torch's load_state_dict takes every group's weight decay, betas and momentum from the saved
    run, where a resume's flags (--weight_decay=0.0) set them. Its kernel choices stay as loaded."""
    own = [{key: value for key, value in group.items() if key not in KEPT_AS_LOADED}
           for group in optimizer.param_groups]
    yield
    for group, settings in zip(optimizer.param_groups, own, strict=True):  # the loaded groups, in the same order
        group.update(settings)


def set_lr(optimizer: torch.optim.AdamW | MuonWithAdamW, lr: float, cfg: OptimizerSettings):
    """This step's learning rate for every group: lr for AdamW's, the same fraction of muon_lr for Muon's."""
    for group in optimizer.param_groups:
        group["lr"] = cfg.muon_lr * (lr / cfg.learning_rate) if group.get("muon") else lr


def ramp(it: int, full: int, iters: int) -> int:
    """A size that grows from a quarter of full to full over the first iters steps, in steps of an eighth
    (few distinct shapes: a compiled model recompiles for each); full from the start when iters is 0."""
    if it >= iters:
        return full
    eighths = math.ceil(2 + 6 * it / iters)  # 2/8 at step 0, growing to 8/8
    return max(1, full * eighths // 8)
