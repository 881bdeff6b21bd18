"""A plain training helper: any model, any ``DataLoader``, any optimizer (``CSGD`` or not).

Run C-SGD on your own model in a few lines (train -> plan -> CSGD -> train_model -> collapse -> merge)::

    import torch, csgd_ext
    from csgd_ext.apps.data import mnist_loaders   # the demo's data: pip install -e ".[demo]"
    from csgd_ext.models import get_model

    torch.manual_seed(0)
    torch.set_num_threads(1)   # on a busy shared CPU one thread can be far faster than two
    train_loader, test_loader = mnist_loaders(batch_size=64, seed=0)   # or your own DataLoaders
    model = get_model("resnet20", width=0.5, num_classes=10, in_channels=1)  # or your own nn.Module

    # 1. train normally, with any optimizer
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
    csgd_ext.train_model(model, train_loader, opt, epochs=3)

    # 2. plan: cluster every coupled group of output channels down to 5/8 of its width
    plan = csgd_ext.plan_clusters(model, torch.randn(1, 1, 28, 28), keep=0.625)

    # 3. C-SGD: cluster members receive their cluster's mean gradient plus a pull to the cluster mean
    opt = csgd_ext.CSGD(plan.param_groups(lr=0.05, weight_decay=1e-4, centripetal=3.0, vector_centripetal_scale=1.0),
                        lr=0.05, momentum=0.9, nesterov=True, clusters=plan.clusters)
    dev = csgd_ext.DeviationLogger(plan, every=20)     # records csgd_ext.deviation(model, plan)
    csgd_ext.train_model(model, train_loader, opt, epochs=3, callbacks=[dev])

    # 4. snap clusters exactly to their means, then merge into a physically smaller model
    csgd_ext.collapse(model, plan)
    small = csgd_ext.merge(model, plan)
    print(csgd_ext.evaluate(model, test_loader), csgd_ext.evaluate(small, test_loader))  # same accuracy

``train_model`` also takes ``scheduler=`` (stepped once per optimizer step), ``scaler=torch.amp.GradScaler(...)``
and ``autocast=torch.bfloat16`` (mixed precision), ``max_steps=`` and ``progress=False``. The centripetal
strength is a budget choice: ``lr * centripetal`` of about 0.15 with Nesterov momentum makes members equal to
float precision within a few hundred steps (the official recipe, 3e-3, is meant for hundreds of epochs). In
the demo the deviation logged by ``DeviationLogger`` falls from 0.57 to 1.2e-7, float32 rounding, within about
140 of its 189 C-SGD steps. Keep training long enough after the members meet for the BatchNorm running
statistics (an EMA) to meet too, or the unmerged model's eval-mode outputs still differ slightly from the
merged model's (``collapse`` snaps them, so the merged model is always exact with respect to the collapsed one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from csgd_ext.training.monitor import deviation
from csgd_ext.measure.progress import progress as make_progress


__all__ = ["TrainState", "train_model", "evaluate", "predict", "Every", "DeviationLogger"]


@dataclass
class TrainState:
    """What callbacks see after every optimizer step."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: int = 0            # optimizer steps done so far (1 after the first step)
    epoch: int = 0
    loss: float = float("nan")
    history: Dict[str, List[Any]] = field(default_factory=lambda: {"step": [], "loss": []})


class Every:
    """Call ``fn(state)`` every ``k`` steps (and on step 1 when ``at_start``).

    Example::

        train_model(model, loader, opt, callbacks=[Every(50, lambda s: print(s.step, s.loss))])
    """

    def __init__(self, k: int, fn: Callable[[TrainState], Any], at_start: bool = True):
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"Every: k must be a positive integer, got {k!r}")
        self.k, self.fn, self.at_start = k, fn, at_start

    def __call__(self, state: TrainState) -> None:
        if state.step % self.k == 0 or (self.at_start and state.step == 1):
            self.fn(state)


class DeviationLogger:
    """Record ``csgd_ext.deviation(model, plan)`` every ``every`` steps into ``self.steps``/``self.values``.

    Example::

        dev = DeviationLogger(plan, every=10)
        train_model(model, loader, opt, callbacks=[dev])
        dev.steps, dev.values          # lists: step index, largest intra-cluster deviation
    """

    def __init__(self, plan, every: int = 10):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"DeviationLogger: every must be a positive integer, got {every!r}")
        self.plan, self.every = plan, every
        self.steps: List[int] = []
        self.values: List[float] = []

    def record(self, model: nn.Module, step: int) -> float:
        v = float(deviation(model, self.plan))
        self.steps.append(int(step))
        self.values.append(v)
        return v

    def __call__(self, state: TrainState) -> None:
        if state.step % self.every == 0 or state.step == 1:
            self.record(state.model, state.step)


def _batches(loader: Iterable, epochs: int, max_steps: Optional[int]):
    step = 0
    for epoch in range(epochs):
        for batch in loader:
            if max_steps is not None and step >= max_steps:
                return
            step += 1
            yield epoch, batch


def train_model(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, *, epochs: int = 1,
        max_steps: Optional[int] = None, loss_fn: Callable = F.cross_entropy, scheduler=None,
        scaler: Optional["torch.amp.GradScaler"] = None, autocast: Optional[torch.dtype] = None,
        callbacks: Sequence[Callable[[TrainState], Any]] = (), progress: bool = True,
        desc: str = "train") -> TrainState:
    """Train ``model`` with ``optimizer`` over ``loader`` for ``epochs`` (or ``max_steps`` optimizer steps).

    Each batch is ``(inputs, targets)``; inputs are moved to the model's device. ``scheduler.step()`` runs
    after every optimizer step; ``callbacks`` are called with a :class:`TrainState` after every step.
    With ``scaler`` the loss is scaled (``scaler.scale(loss).backward(); scaler.step(opt); scaler.update()``);
    with ``autocast`` (a dtype such as ``torch.bfloat16``) the forward runs under ``torch.autocast``.
    Returns the final :class:`TrainState` (``history["loss"]`` holds every step's loss).

    Example::

        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        state = train_model(model, train_loader, opt, epochs=2)
        print(state.step, state.history["loss"][-1])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"train_model: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"train_model: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"train_model: epochs must be a positive integer, got {epochs!r}")
    if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
        raise ValueError(f"train_model: max_steps must be a positive integer or None, got {max_steps!r}")
    if autocast is not None and not isinstance(autocast, torch.dtype):
        raise TypeError(f"train_model: autocast must be a torch.dtype such as torch.bfloat16, got {autocast!r}")
    try:
        device = next(model.parameters()).device
    except StopIteration:
        raise ValueError("fit: model has no parameters to train") from None
    total = max_steps
    if total is None:
        try:
            total = epochs * len(loader)  # type: ignore[arg-type]
        except TypeError:
            total = None
    state = TrainState(model=model, optimizer=optimizer)
    bar = make_progress(total=total, desc=desc, enabled=progress)
    model.train()
    try:
        for epoch, (x, y) in _batches(loader, epochs, max_steps):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            if autocast is not None:
                with torch.autocast(device_type=device.type, dtype=autocast):
                    loss = loss_fn(model(x), y)
            else:
                loss = loss_fn(model(x), y)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            if scheduler is not None:
                scheduler.step()
            state.step += 1
            state.epoch = epoch
            state.loss = float(loss.detach())
            state.history["step"].append(state.step)
            state.history["loss"].append(state.loss)
            for cb in callbacks:
                cb(state)
            bar.update(1, **({"loss": f"{state.loss:.3f}"} if state.step % 10 == 0 else {}))
    finally:
        bar.close()
    return state


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable) -> torch.Tensor:
    """Concatenated model outputs (logits) over ``loader`` in eval mode.

    Example::

        logits = predict(model, test_loader)      # (N, num_classes)
    """
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    outs = [model(x.to(device)).float().cpu() for x, _ in loader]
    model.train(was_training)
    return torch.cat(outs) if outs else torch.empty(0)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable) -> float:
    """Top-1 accuracy of ``model`` over ``loader`` as a fraction in [0, 1] (eval mode, no gradients).

    Example::

        acc = evaluate(model, test_loader)        # e.g. 0.957
    """
    logits = predict(model, loader)
    targets = torch.cat([y for _, y in loader])
    if targets.numel() == 0:
        raise ValueError("evaluate: loader is empty")
    return float((logits.argmax(1) == targets).float().mean())
