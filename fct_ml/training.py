"""The one training loop, the device policy, seeding, and frozen encoders.

Everything that trains in fct_ml (old model, side-info model, new model, BCT model,
transformation h) goes through `fit`: an objective turns a batch into named loss parts,
`fit` owns the optimiser, the cosine schedule with linear warm-up, mixed precision and
the per-epoch history. Frozen encoders are put in eval mode under no_grad in `Frozen`, and
nowhere else.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation of one training stage."""

    epochs: int = 10
    batch_size: int = 256
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9  # sgd only
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0  # linear warm-up, then cosine decay to zero
    label_smoothing: float = 0.1  # used by the objectives with a cross-entropy term
    # Fraction of the epochs after which BatchNorm layers switch to eval mode (running
    # statistics frozen). The paper does this halfway through training h; None: never.
    bn_eval_after: float | None = None


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> cuda when present, else cpu; anything else is passed to torch.device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; returns a CPU generator for data order and augmentation."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def autocast(device: torch.device):
    """bf16 autocast on CUDA; on the CPU a no-op (bf16 conv there is slower than fp32)."""
    return torch.autocast(
        device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"
    )


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Move to `device` in channels_last layout (faster for convolutions on CUDA, and on this
    project's 2-core CPU too: a cnn-s training step on 256 Fashion-MNIST-sized images took 95 ms
    instead of 126 ms, 1.32x)."""
    return model.to(device=device, memory_format=torch.channels_last)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a CPU batch to `device`, through pinned memory on CUDA so the copy can overlap."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class Frozen:
    """A trained module used as a fixed function: eval mode, no gradients, no parameter updates.

    `method` names the module's method to call ("forward" by default). Outputs come back as
    float32 (a tensor or a tuple of tensors) on the module's device.
    """

    def __init__(self, module: nn.Module, method: str = "forward"):
        self.module = module.eval().requires_grad_(False)
        self.fn = getattr(module, method)

    @torch.no_grad()
    def __call__(self, *inputs: torch.Tensor):
        device = next(self.module.parameters()).device
        with autocast(device):
            out = self.fn(*(to_device(x, device) for x in inputs))  # pinned, non-blocking on CUDA
        if isinstance(out, tuple):
            return tuple(o.float() for o in out)
        return out.float()


def encode(
    module: nn.Module,
    inputs: Sequence[torch.Tensor],
    *,
    batch_size: int = 1024,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Run a frozen `module` over aligned `inputs` (each (N, ...)) in batches; returns (N, D) on CPU.

    `transform` is applied to the first input of each batch on the module's device (e.g.
    uint8 -> float scaling).
    """
    frozen = Frozen(module)
    device = next(module.parameters()).device
    n = inputs[0].shape[0]
    outs = []
    for start in range(0, n, batch_size):
        batch = [to_device(t[start : start + batch_size], device) for t in inputs]
        if transform is not None:
            batch[0] = transform(batch[0])
        outs.append(frozen(*batch).cpu())
    return torch.cat(outs) if outs else torch.empty(0)


class Objective(Protocol):
    """A batch (tuple of tensors on the device) -> named loss parts; "loss" is the one minimised."""

    def __call__(self, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]: ...


@dataclass(frozen=True)
class EpochRecord:
    epoch: int  # 1-based
    seconds: float
    lr: float  # at the end of the epoch
    parts: dict[str, float]  # mean of each loss part over the epoch's batches


def _optimizer(params, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            nesterov=True,
        )
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up from ~0 to 1 over `warmup_steps`, then cosine decay to 0 at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _set_bn_eval(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def fit(
    model: nn.Module,
    objective: Objective,
    data: Sequence[torch.Tensor],
    config: TrainConfig,
    *,
    generator: torch.Generator,
    desc: str = "train",
    progress: bool = True,
    on_epoch: Callable[[EpochRecord], None] | None = None,
) -> list[EpochRecord]:
    """Train the parameters of `model` (already on its device) to minimise `objective` over `data`.

    `data` is a sequence of aligned CPU tensors (N, ...); each step draws a shuffled batch of
    `config.batch_size` rows (the last partial batch is dropped, as BatchNorm and NT-Xent
    need full batches), moves it to the model's device and calls `objective`.
    Returns one EpochRecord per epoch.
    """
    device = next(model.parameters()).device
    n = data[0].shape[0]
    if n == 0:
        raise ValueError(f"{desc}: no training data")
    if config.batch_size < 1:
        raise ValueError(f"{desc}: batch_size must be >= 1, got {config.batch_size}")
    batch_size = min(config.batch_size, n)
    steps_per_epoch = n // batch_size
    total = steps_per_epoch * config.epochs
    warmup = (
        min(total, max(1, round(config.warmup_epochs * steps_per_epoch)))
        if config.warmup_epochs > 0
        else 0
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(params, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup))
    bn_eval_epoch = (
        None if config.bn_eval_after is None else int(config.bn_eval_after * config.epochs)
    )
    history: list[EpochRecord] = []
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for epoch in range(config.epochs):
        model.train()
        if bn_eval_epoch is not None and epoch >= bn_eval_epoch:
            _set_bn_eval(model)
        start = time.perf_counter()
        order = torch.randperm(n, generator=generator)
        sums: dict[str, torch.Tensor] = {}
        for step in range(steps_per_epoch):
            idx = order[step * batch_size : (step + 1) * batch_size]
            batch = tuple(to_device(t[idx], device) for t in data)
            with autocast(device):
                parts = objective(batch)
            loss = parts["loss"]
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"{desc}: loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            for k, v in parts.items():
                v = v.detach().float()
                sums[k] = sums[k] + v if k in sums else v
            bar.update(1)
        record = EpochRecord(
            epoch=epoch + 1,
            seconds=time.perf_counter() - start,
            lr=optimizer.param_groups[0]["lr"],
            parts={k: float(v) / steps_per_epoch for k, v in sums.items()},
        )
        history.append(record)
        bar.set_postfix(loss=f"{record.parts['loss']:.4f}")
        if on_epoch is not None:
            on_epoch(record)
    bar.close()
    model.eval()
    return history
