"""The recipe every application run shares: optimizers, LR schedule, determinism, base and C-SGD training.

The demo, the comparison and squeeze all train with these, so their numbers are comparable: SGD with
Nesterov momentum 0.9 and a cosine LR schedule for the base model, C-SGD over a plan with the same momentum
for the pruning run.

Example::

    from csgd_ext.apps.recipes import set_determinism, train_base, train_csgd
    set_determinism(seed=0, threads=1)
    base = train_base(cfg, train_loader)            # cfg: a DemoConfig (arch, width, epochs, lr, ...)
    dev = train_csgd(model, plan, cfg, train_loader) # dev.values: the intra-cluster deviation over steps
"""

from __future__ import annotations

import random
from typing import Optional

import numpy as np
import torch
from torch import nn

from ..models import get_model
from ..optim import CSGD
from ..train import DeviationLogger, fit
from .data import NUM_CLASSES

__all__ = ["TRAINING_BACKEND", "set_determinism", "make_sgd", "make_csgd", "cosine", "build_model", "train_base",
           "train_csgd"]


#: the C-SGD backend the applications train with (see :func:`train_csgd`)
TRAINING_BACKEND = "reference"


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


def build_model(arch: str, width: float) -> nn.Module:
    """The zoo model ``arch`` at ``width`` for the demo's data (1 input channel, 10 classes)."""
    return get_model(arch, width=width, num_classes=NUM_CLASSES, in_channels=1)


def train_base(cfg, train_loader, width: Optional[float] = None, epochs: Optional[int] = None,
               desc: str = "base (SGD)") -> nn.Module:
    """A zoo model (``cfg.arch`` at ``width``, default ``cfg.width``) trained with SGD + cosine LR for ``epochs``
    (default ``cfg.epochs``)."""
    model = build_model(cfg.arch, cfg.width if width is None else width)
    ep = cfg.epochs if epochs is None else epochs
    opt = make_sgd(model.parameters(), cfg.lr, cfg.weight_decay)
    fit(model, train_loader, opt, epochs=ep, scheduler=cosine(opt, ep * len(train_loader)),
        progress=cfg.progress, desc=desc)
    return model


def train_csgd(model: nn.Module, plan, cfg, train_loader, epochs: Optional[int] = None,
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
    fit(model, train_loader, opt, epochs=ep, scheduler=cosine(opt, ep * len(train_loader)),
        callbacks=[dev], progress=cfg.progress, desc=desc)
    dev.record(model, len(train_loader) * ep)
    return dev
