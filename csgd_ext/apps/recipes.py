"""The recipe every application run shares: optimizers, LR schedule, determinism, base and C-SGD training.

The demo, the comparison and squeeze all train with these, so their numbers are comparable: SGD with
Nesterov momentum 0.9 and a cosine LR schedule for the base model, C-SGD over a plan with the same momentum
for the pruning run.

Example::

    from csgd_ext.apps.recipes import set_determinism, train_base, train_csgd
    set_determinism(seed=0, threads=1)
    recipe = Recipe(arch="resnet20", width=0.5, epochs=3)
    base = train_base(recipe, train_loader)
    dev = train_csgd(model, plan, recipe, train_loader) # dev.values: the intra-cluster deviation over steps
"""

from __future__ import annotations

import random
from dataclasses import dataclass, fields
from typing import Optional

import numpy as np
import torch
from torch import nn

from csgd_ext.models import get_model
from csgd_ext.optim.csgd import CSGD
from csgd_ext.training.loop import DeviationLogger, train_model
from csgd_ext.apps.data import NUM_CLASSES

__all__ = ["TRAINING_BACKEND", "Recipe", "set_determinism", "make_sgd", "make_csgd", "cosine", "demo_model",
           "train_base", "train_csgd"]


#: the C-SGD backend the applications train with (see :func:`train_csgd`)
TRAINING_BACKEND = "reference"


@dataclass
class Recipe:
    """What :func:`train_base` and :func:`train_csgd` read: the zoo model and how to train it. The demo's and
    squeeze's configs give one (the demo's is one, :meth:`of` reads squeeze's)."""

    arch: str = "resnet20"
    width: float = 0.5              # zoo width multiplier (resnet20 at 0.5: 8/16/32 channels)
    epochs: int = 3                 # epochs of base training, and again of C-SGD training
    lr: float = 0.05
    weight_decay: float = 1e-4
    # strong pull: with Nesterov momentum, lr * centripetal ~ 0.15 shrinks the intra-cluster deviation ~10x
    # per ~15 steps, so a few hundred steps make cluster members equal to float precision
    centripetal: float = 3.0
    vector_centripetal_scale: float = 1.0
    backend: str = TRAINING_BACKEND  # of C-SGD training (the demo's step-time measurement uses "auto")
    progress: bool = True

    @classmethod
    def of(cls, config) -> "Recipe":
        """The recipe fields of any config object that has them (the demo's, squeeze's)."""
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls) if hasattr(config, f.name)})


def set_determinism(seed: int, threads: int) -> None:
    """Seed torch (and Python's and NumPy's global generators), fix the intra-op thread count and ask for
    deterministic algorithms."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)


def make_sgd(params, lr: float, weight_decay: float) -> torch.optim.SGD:
    """The baseline optimizer of every run: SGD, momentum 0.9, Nesterov."""
    return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)


def make_csgd(plan, lr: float, weight_decay: float, centripetal: float, vector_centripetal_scale: float = 1.0,
              backend: str = "auto"):
    """C-SGD over ``plan`` with the same momentum/Nesterov as :func:`make_sgd`, on ``backend``."""
    groups = plan.param_groups(lr=lr, weight_decay=weight_decay, centripetal=centripetal,
                               vector_centripetal_scale=vector_centripetal_scale)
    return CSGD(groups, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay,
                centripetal=centripetal, clusters=plan.clusters, backend=backend)


def cosine(opt: torch.optim.Optimizer, steps: int):
    """The LR schedule of every run: cosine annealing over ``steps`` optimizer steps."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))


def demo_model(arch: str, width: float) -> nn.Module:
    """The zoo model ``arch`` at ``width`` for the demo's data (1 input channel, 10 classes)."""
    return get_model(arch, width=width, num_classes=NUM_CLASSES, in_channels=1)


def train_base(cfg: Recipe, train_loader, width: Optional[float] = None, epochs: Optional[int] = None,
               desc: str = "base (SGD)") -> nn.Module:
    """A zoo model (``cfg.arch`` at ``width``, default ``cfg.width``) trained with SGD + cosine LR for ``epochs``
    (default ``cfg.epochs``)."""
    model = demo_model(cfg.arch, cfg.width if width is None else width)
    ep = cfg.epochs if epochs is None else epochs
    opt = make_sgd(model.parameters(), cfg.lr, cfg.weight_decay)
    train_model(model, train_loader, opt, epochs=ep, scheduler=cosine(opt, ep * len(train_loader)),
        progress=cfg.progress, desc=desc)
    return model


def train_csgd(model: nn.Module, plan, cfg: Recipe, train_loader, epochs: Optional[int] = None,
               log_every: int = 10, desc: str = "C-SGD") -> DeviationLogger:
    """Train ``model`` in place with C-SGD over ``plan`` on ``cfg.backend``; returns the deviation log.

    The runs train on the reference backend (:data:`TRAINING_BACKEND`): its numbers are plain PyTorch, so a seed
    gives the same results whether and however the native extension was built. The native kernel rounds cluster
    means differently (by about one unit in the last place: it multiplies by the reciprocal of the cluster size),
    and over hundreds of steps that changes test accuracy.
    """
    ep = cfg.epochs if epochs is None else epochs
    opt = make_csgd(plan, cfg.lr, cfg.weight_decay, cfg.centripetal, cfg.vector_centripetal_scale, cfg.backend)
    dev = DeviationLogger(plan, every=log_every)
    dev.record(model, 0)
    train_model(model, train_loader, opt, epochs=ep, scheduler=cosine(opt, ep * len(train_loader)),
        callbacks=[dev], progress=cfg.progress, desc=desc)
    dev.record(model, len(train_loader) * ep)
    return dev
