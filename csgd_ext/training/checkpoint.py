"""Atomic, verified checkpoints of a C-SGD run: model, optimizer (momentum buffers and cluster ids),
cluster plan, step counter, RNG states and any extra state, in one file.

Example::

    import csgd_ext
    csgd_ext.save_checkpoint("run/ckpt.pt", model=model, optimizer=opt, plan=plan, step=step,
                             scheduler=sched, scaler=scaler, extra={"epoch": epoch})
    ...
    ck = csgd_ext.load_checkpoint("run/ckpt.pt", model=model, optimizer=opt, scheduler=sched, scaler=scaler)
    step, plan = ck.step, ck.plan          # plan: a ``ClusterPlan`` rebuilt on ``model``
    small = csgd_ext.load_merged("merged.pt", make_net())   # a model written by ``prune --out``

Guarantees:

* **Plain, safe file.** The file is an ordinary ``torch.save`` archive holding only tensors, numbers,
  strings, lists and dicts (the plan is stored in its JSON/dict form, RNG states as tensors / lists), so
  ``torch.load(path, weights_only=True)`` reads it and nothing is unpickled as code.
* **Atomic.** The data are written to a temporary file in the same directory, flushed and ``fsync``-ed,
  then moved over ``path`` with ``os.replace`` (and the directory is ``fsync``-ed). A process killed at any
  moment leaves either the previous complete checkpoint or no file at ``path`` (plus, at worst, a stray
  ``.<name>.*.tmp`` file that is never read).
* **Verified.** A magic string, a format version and a SHA-256 digest of the whole content (every tensor's
  dtype, shape and bytes and every value in the structure) are stored; :func:`load_checkpoint` checks all
  three and turns any failure (truncated archive, flipped bytes, a file that is not a checkpoint) into a
  ``ValueError`` naming the file. Nothing is written into the model or optimizer before the check passes.
* **Bit-identical resume.** With ``rng=True`` (the default) the CPU (and CUDA) generators of torch, Python's
  ``random`` and NumPy's global generator are saved and, by default, restored; pass your own
  ``torch.Generator`` objects (data order, augmentation) as ``generators={"data": g}``. A run resumed from
  step k then continues exactly as the uninterrupted run (tested on CPU for every backend).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import struct
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

import torch

from csgd_ext.merging.merge import merge
from csgd_ext.plan.records import ClusterPlan
from csgd_ext.version import __version__

__all__ = ["save_checkpoint", "load_checkpoint", "read_checkpoint", "load_merged", "LoadedCheckpoint", "MAGIC",
           "FORMAT_VERSION"]

MAGIC = "csgd_ext.training.checkpoint"
FORMAT_VERSION = 1


# -- content digest ------------------------------------------------------------------------------------
def _hash_into(h, obj: Any, where: str) -> None:
    """Feed a canonical encoding of ``obj`` (tensors, numbers, strings, containers) into hash ``h``."""
    if isinstance(obj, torch.Tensor):
        if obj.is_sparse or obj.layout != torch.strided:
            raise TypeError(f"checkpoint content at {where} is a non-strided tensor ({obj.layout}); "
                            "only dense tensors can be checkpointed")
        t = obj.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}:".encode())
        if t.numel():
            if t.dtype.is_complex:
                t = torch.view_as_real(t).reshape(-1)
            h.update(memoryview(t.view(torch.uint8).numpy()))
    elif isinstance(obj, Mapping):
        items = sorted(obj.items(), key=lambda kv: (type(kv[0]).__name__, repr(kv[0])))
        h.update(f"D{len(items)}:".encode())
        for k, v in items:
            _hash_into(h, k, where)
            _hash_into(h, v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)}:".encode())
        for i, v in enumerate(obj):
            _hash_into(h, v, f"{where}[{i}]")
    elif obj is None or type(obj) in (bool, int, str):  # exact types: subclasses may not load back safely
        h.update(f"{type(obj).__name__}:{obj!r};".encode())
    elif type(obj) is float:
        h.update(b"float:" + struct.pack("<d", obj))
    elif isinstance(obj, (torch.dtype, torch.device, torch.Size)):
        h.update(f"{type(obj).__name__}:{obj};".encode())
    else:
        raise TypeError(f"checkpoint content at {where} has type {type(obj).__name__}, which cannot be stored "
                        "safely (use tensors, numbers, strings, lists and dicts)")


def _digest(obj: Any) -> str:
    h = hashlib.sha256()
    _hash_into(h, obj, "checkpoint")
    return h.hexdigest()


# -- pieces ---------------------------------------------------------------------------------------------
def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` (so keys carry no ``module.``)."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while isinstance(model, (DataParallel, DistributedDataParallel)):
        model = model.module
    return model


def _plan_to_dict(plan: Any) -> Optional[dict]:
    if plan is None:
        return None
    if isinstance(plan, Mapping):
        return json.loads(json.dumps(plan))
    if callable(getattr(plan, "to_dict", None)):  # a ClusterPlan, or an object of yours with to_dict()
        return json.loads(json.dumps(plan.to_dict()))
    raise TypeError(f"plan must be a ClusterPlan (or have to_dict()) or a dict, got {type(plan).__name__}")


def _plan_from_dict(d: Optional[dict], model: torch.nn.Module, path: str) -> Optional[ClusterPlan]:
    """Rebuild the ``ClusterPlan`` saved in its dict form on ``model``."""
    if d is None:
        return None
    try:
        return ClusterPlan.from_dict(d, model)
    except ValueError as e:
        raise ValueError(f"checkpoint {path!r}: its cluster plan does not match the model: {e}") from e


def _rng_state() -> dict:
    st: Dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    version, internal, gauss = random.getstate()
    st["python"] = [version, list(internal), gauss]
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        st["numpy"] = [str(name), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]
    except ImportError:  # numpy is a dependency, but do not fail a save over it
        pass
    return st


def _set_rng_state(st: Mapping) -> None:
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        cuda = list(st["cuda"])
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    if "python" in st:
        version, internal, gauss = st["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in st:
        import numpy as np

        name, keys, pos, has_gauss, cached = st["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


# -- atomic write ---------------------------------------------------------------------------------------
def _atomic_torch_save(obj: Any, path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # some filesystems (or platforms) do not allow fsync on a directory
        pass


# -- public API -----------------------------------------------------------------------------------------
def save_checkpoint(path, *, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    plan: Any = None, step: int = 0, extra: Optional[Mapping] = None,
                    scheduler: Any = None, scaler: Any = None, rng: bool = True,
                    generators: Optional[Mapping[str, torch.Generator]] = None) -> str:
    """Atomically write a verified checkpoint to ``path`` and return ``path``.

    Args:
        model: the model (a ``DistributedDataParallel``/``DataParallel`` wrapper is unwrapped).
        optimizer: any optimizer; for :class:`csgd_ext.CSGD` its state dict carries momentum buffers and
            cluster ids.
        plan: a ``ClusterPlan`` (stored in its JSON/dict form) or a JSON-able dict, or None.
        step: the number of completed steps (an int).
        extra: a dict of your own (tensors, numbers, strings, lists, dicts), returned by :func:`load_checkpoint`.
        scheduler, scaler: objects with ``state_dict()`` (LR scheduler, ``torch.amp.GradScaler``).
        rng: also store the global RNG states (torch CPU and CUDA, Python ``random``, NumPy).
        generators: ``{name: torch.Generator}`` whose states are stored (e.g. the DataLoader's generator).

    Example::

        save_checkpoint("ckpt.pt", model=model, optimizer=opt, plan=plan, step=1000)
    """
    path = os.fspath(path)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if extra is not None and not isinstance(extra, Mapping):
        raise TypeError(f"extra must be a dict, got {type(extra).__name__}")
    payload: Dict[str, Any] = {
        "step": step,
        "model": _unwrap(model).state_dict(),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "plan": _plan_to_dict(plan),
        # a ClusterPlan object is rebuilt on the model at load time; a plain dict comes back as the dict
        "plan_kind": None if plan is None else ("ClusterPlan" if isinstance(plan, ClusterPlan) else "dict"),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "scaler": None if scaler is None else scaler.state_dict(),
        "rng": _rng_state() if rng else None,
        "generators": {str(k): g.get_state() for k, g in (generators or {}).items()},
        "extra": dict(extra) if extra is not None else None,
        "torch_version": str(torch.__version__),
    }
    payload["csgd_ext_version"] = str(__version__)
    digest = _digest(payload)  # also rejects content that weights_only loading could not read back
    _atomic_torch_save({"magic": MAGIC, "format_version": FORMAT_VERSION, "sha256": digest,
                        "payload": payload}, path)
    return path


@dataclass
class LoadedCheckpoint:
    """What :func:`load_checkpoint` found: ``step``, ``plan`` (a ``ClusterPlan`` rebuilt on the model when one was
    saved; the dict itself when a dict was saved; None), ``extra`` and the raw verified ``payload``."""

    path: str
    step: int
    plan: Any = None
    extra: Optional[dict] = None
    payload: dict = field(default_factory=dict, repr=False)


def read_checkpoint(path, map_location="cpu") -> dict:
    """Load and verify the checkpoint at ``path`` without touching any model; returns its payload dict.

    Raises ``ValueError`` naming the file when it is truncated, corrupt, edited, or not a csgd_ext checkpoint.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, unsafe content...
        raise ValueError(f"{path!r} is not a readable csgd_ext checkpoint (truncated or corrupt file?): "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    if not isinstance(obj, dict) or obj.get("magic") != MAGIC:
        raise ValueError(f"{path!r} is not a csgd_ext checkpoint (no {MAGIC!r} magic; written by another tool?)")
    version = obj.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path!r} has checkpoint format version {version!r}; this csgd_ext reads version "
                         f"{FORMAT_VERSION}")
    payload = obj.get("payload")
    if not isinstance(payload, dict):
        raise ValueError(f"{path!r} is corrupt: its payload is missing")
    try:
        digest = _digest(payload)
    except TypeError as e:
        raise ValueError(f"{path!r} is corrupt: {e}") from e
    if digest != obj.get("sha256"):
        raise ValueError(f"{path!r} is corrupt: its content does not match the stored SHA-256 digest "
                         "(edited or damaged after it was written)")
    return payload


def load_checkpoint(path, *, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    scheduler: Any = None, scaler: Any = None, restore_rng: bool = True,
                    generators: Optional[Mapping[str, torch.Generator]] = None, strict: bool = True,
                    map_location="cpu") -> LoadedCheckpoint:
    """Verify the checkpoint at ``path``, then restore it into ``model`` (and the optional ``optimizer``,
    ``scheduler``, ``scaler``, global RNGs and named ``generators``).

    The file is verified completely (magic, version, SHA-256 digest) before anything is modified; a bad file
    raises ``ValueError`` naming it. Build the optimizer exactly as for the original run (same param groups,
    same parameter order) before loading into it.

    Example::

        ck = load_checkpoint("ckpt.pt", model=model, optimizer=opt)
        for step in range(ck.step, total_steps): ...
    """
    path = os.fspath(path)
    payload = read_checkpoint(path, map_location=map_location)
    target = _unwrap(model)
    if optimizer is not None and payload.get("optimizer") is None:
        raise ValueError(f"checkpoint {path!r} holds no optimizer state, but an optimizer was given")
    if scheduler is not None and payload.get("scheduler") is None:
        raise ValueError(f"checkpoint {path!r} holds no scheduler state, but a scheduler was given")
    if scaler is not None and payload.get("scaler") is None:
        raise ValueError(f"checkpoint {path!r} holds no GradScaler state, but a scaler was given")
    missing = sorted(set(generators or {}) - set(payload.get("generators") or {}))
    if missing:
        raise ValueError(f"checkpoint {path!r} holds no state for generators {missing}")
    try:
        target.load_state_dict(payload["model"], strict=strict)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {path!r} does not fit the model: {e}") from e
    plan = payload.get("plan")
    if payload.get("plan_kind") == "ClusterPlan":
        plan = _plan_from_dict(plan, target, path)
    if optimizer is not None:
        try:
            optimizer.load_state_dict(payload["optimizer"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise ValueError(f"checkpoint {path!r}: its optimizer state does not fit this optimizer: {e}") from e
    if scheduler is not None:
        scheduler.load_state_dict(payload["scheduler"])
    if scaler is not None:
        scaler.load_state_dict(payload["scaler"])
    if restore_rng and payload.get("rng") is not None:
        _set_rng_state(payload["rng"])
    for name, g in (generators or {}).items():
        g.set_state(payload["generators"][name])
    return LoadedCheckpoint(path=path, step=int(payload["step"]), plan=plan, extra=payload.get("extra"),
                            payload=payload)


def load_merged(path, model: torch.nn.Module) -> torch.nn.Module:
    """Rebuild the merged model written by ``python -m csgd_ext prune --out`` (a checkpoint of the merged model
    with its plan) from a fresh, unpruned ``model`` of the same architecture: no pickled code is loaded.

    Raises ``ValueError`` naming the file when it holds no plan or does not fit ``model``.

    Example::

        small = csgd_ext.load_merged("merged.pt", make_net())     # the same factory as --model
    """
    path = os.fspath(path)
    payload = read_checkpoint(path)
    plan_dict = payload.get("plan")
    if plan_dict is None:
        raise ValueError(f"{path!r} holds no cluster plan: not written by `python -m csgd_ext prune --out`")
    small = merge(model, _plan_from_dict(plan_dict, model, path))
    try:
        small.load_state_dict(payload["model"])
    except RuntimeError as e:
        raise ValueError(f"{path!r} does not fit the merged model: {e}") from e
    return small
