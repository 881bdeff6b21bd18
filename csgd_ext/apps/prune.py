"""The ``prune`` command: plan clusters for your own model and write the merged model.

Typical workflow::

    # 1. plan (the model's current weights, e.g. a trained checkpoint, drive the k-means clustering)
    python -m csgd_ext prune --model mypkg.nets:make_net --input-shape 3,32,32 --keep 0.625 \\
        --checkpoint trained.pt --plan-out plan.json
    # 2. train with C-SGD in your own loop (csgd_ext.ClusterPlan.load("plan.json", model), csgd_ext.CSGD,
    #    csgd_ext.train_model), saving the weights (csgd_ext.save_checkpoint or torch.save(state_dict))
    # 3. collapse + merge into a physically smaller model
    python -m csgd_ext prune --model mypkg.nets:make_net --input-shape 3,32,32 --plan plan.json \\
        --checkpoint csgd_trained.pt --out merged.pt

Instead of ``--keep F`` (every group keeps that fraction), ``--target-flops F`` chooses each group's width so the
merged model has between F - 0.05 and F of the FLOPs; ``--round-to N`` makes every kept width a multiple of N (see
:func:`csgd_ext.plan_clusters`; default 8, which ran slightly faster on CPU at the same FLOPs (median 1.04x,
``benchmarks/zoo/latency_equal_flops.py``), and ``--round-to 1`` turns it off). Both are stored in the plan file.

``--model`` is ``package.module:factory`` (a zero-argument callable returning an ``nn.Module``) or a zoo
name (``resnet20``, ``resnet56``, ``vgg16``, ...; ``--num-classes`` and the ``C`` of ``--input-shape`` are
passed to it). ``--checkpoint`` reads a csgd_ext checkpoint, a plain ``state_dict`` file, or a dict holding
one under ``"state_dict"``/``"model"``. ``--out`` is a csgd_ext checkpoint of the merged model with the plan
embedded; reload it with :func:`csgd_ext.load_merged`. Beside ``--out X.pt`` go ``X.pt2`` (``torch.export``) and,
with the ``[export]`` extra, ``X.onnx``: the merged model without csgd_ext (:mod:`csgd_ext.apps.export`;
``--export pt2|none`` writes less). Existing outputs are never overwritten without ``--force``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Tuple

import torch
from torch import nn

from csgd_ext.training.checkpoint import save_checkpoint
from csgd_ext.merging.merge import merge
from csgd_ext.training.monitor import collapse
from csgd_ext.models import available_models, get_model
from csgd_ext.plan.records import ClusterPlan
from csgd_ext.planning.planner import plan_clusters
from csgd_ext.apps.args import CLIError, first_line, keep_fraction, positive_int
from csgd_ext.apps.export import EXPORT_CHOICES, EXPORT_SUFFIXES, export_merged, summary
from csgd_ext.apps.weights import load_weights

__all__ = ["register", "load_user_model", "parse_input_shape", "run_prune",
           "DESCRIPTION", "ROUND_TO", "plan_round_to"]

#: the default of ``--round-to`` in ``prune`` and ``fit``: at the same FLOPs, merged models whose widths are
#: multiples of 8 ran slightly faster on CPU than unrounded ones (median 1.04x, faster in 20 of 24 configurations;
#: benchmarks/zoo/latency_equal_flops.py)
ROUND_TO = 8
ROUND_TO_HELP = (f"every kept width a multiple of N (default {ROUND_TO}: at the same FLOPs such widths ran slightly "
                 "faster on CPU; a group narrower than N keeps its whole width); 1: no rounding")


def plan_round_to(n: int):
    """``--round-to N`` as :func:`csgd_ext.plan_clusters` takes it: None (no rounding) for 1."""
    return None if n == 1 else n

DESCRIPTION = ("Plan clusters for your own model (--keep F, written with --plan-out) and collapse and merge it "
               "into a physically smaller model (--plan FILE and --out FILE; reload it with "
               "csgd_ext.load_merged(path, model)).")


def parse_input_shape(text: str) -> Tuple[int, ...]:
    """``"3,32,32"`` -> ``(3, 32, 32)``; raises :class:`CLIError` for anything but positive integers."""
    parts = [p.strip() for p in str(text).replace("x", ",").split(",")]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise CLIError(f"--input-shape must be C,H,W with positive integers, got {text!r}") from None
    if len(shape) != 3 or any(s < 1 for s in shape):
        raise CLIError(f"--input-shape must be C,H,W with positive integers, got {text!r}")
    return shape


def load_user_model(spec: str, in_channels: int, num_classes: int) -> nn.Module:
    """Build ``package.module:factory()`` or the zoo model ``spec``; errors are one-line :class:`CLIError`."""
    if ":" in spec:
        mod_name, _, fn_name = spec.partition(":")
        if not mod_name or not fn_name:
            raise CLIError(f"--model must be package.module:factory or a zoo name, got {spec!r}")
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(mod_name)
        except Exception as e:  # noqa: BLE001 - ModuleNotFoundError, or the module's own import error
            raise CLIError(f"--model: cannot import module {mod_name!r}: {type(e).__name__}: {first_line(e)}") \
                from None
        factory = getattr(module, fn_name, None)
        if factory is None or not callable(factory):
            raise CLIError(f"--model: module {mod_name!r} has no callable {fn_name!r}")
        try:
            model = factory()
        except Exception as e:  # noqa: BLE001 - any failure of user code becomes one line
            raise CLIError(f"--model: factory {spec!r} failed: {type(e).__name__}: {first_line(e)}") from None
        if not isinstance(model, nn.Module):
            raise CLIError(f"--model: factory {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
        return model
    try:
        return get_model(spec, num_classes=num_classes, in_channels=in_channels)
    except (ValueError, TypeError, KeyError) as e:
        raise CLIError(f"--model: {spec!r} is not package.module:factory nor a zoo model ({first_line(e)})") \
            from None


def _check_request(args) -> None:
    """What to do and where to write it: --keep or --plan, the output files (after the model is checked)."""
    if args.keep is not None and args.target_flops is not None:
        raise CLIError("--keep and --target-flops: give one of them, not both")
    planning = args.keep is not None or args.target_flops is not None
    if not planning and args.plan is None:
        raise CLIError("give --keep F or --target-flops F (plan now) or --plan FILE (a plan written by --plan-out)")
    if planning and args.plan is not None:
        raise CLIError("give either --keep/--target-flops or --plan, not both")
    if args.plan is not None and not os.path.isfile(args.plan):
        raise CLIError(f"--plan: no such file {args.plan!r}")
    if args.plan_out is None and args.out is None:
        raise CLIError("nothing to write: give --plan-out FILE and/or --out FILE")
    stem = os.path.splitext(args.out)[0] if args.out else None
    exports = [("--out", stem + s) for s in EXPORT_SUFFIXES] if args.out and args.export != "none" else []
    for flag, path in [("--plan-out", args.plan_out), ("--out", args.out)] + exports:
        if path is None:
            continue
        if os.path.isdir(path):
            raise CLIError(f"{flag}: {path!r} is a directory")
        if os.path.exists(path) and not args.force:
            raise CLIError(f"{flag}: {path!r} exists; pass --force to overwrite it")
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise CLIError(f"{flag}: directory {parent!r} does not exist")
    if args.out and args.checkpoint and os.path.abspath(args.out) == os.path.abspath(args.checkpoint):
        raise CLIError("--out must differ from --checkpoint (the input would be overwritten)")
    if args.plan_out and args.out and os.path.abspath(args.plan_out) == os.path.abspath(args.out):
        raise CLIError("--plan-out and --out must be different files")


def _get_plan(args, model: nn.Module, example: torch.Tensor) -> ClusterPlan:
    if args.plan is not None:
        try:
            return ClusterPlan.load(args.plan, model)
        except (ValueError, OSError) as e:
            raise CLIError(f"--plan: {first_line(e)}") from None
    try:
        return plan_clusters(model, example, keep=args.keep, seed=args.seed, target_flops=args.target_flops,
                             round_to=plan_round_to(args.round_to))
    except (ValueError, TypeError) as e:
        raise CLIError(f"planning failed: {first_line(e)}") from None


def run_prune(args: argparse.Namespace) -> int:
    """The ``prune`` sub-command (see the module docstring)."""
    shape = parse_input_shape(args.input_shape)
    torch.manual_seed(args.seed)  # a zoo model's (or an unseeded factory's) random initial weights
    model = load_user_model(args.model, shape[0], args.num_classes)
    model.eval()
    example = torch.zeros(1, *shape)
    try:
        with torch.no_grad():
            model(example)
    except Exception as e:  # noqa: BLE001
        raise CLIError(f"--input-shape {args.input_shape}: the model does not run on a 1x{shape[0]}x{shape[1]}x"
                       f"{shape[2]} input ({type(e).__name__}: {first_line(e)})") from None
    loaded = load_weights(model, args.checkpoint, "--checkpoint") if args.checkpoint else None
    _check_request(args)
    if loaded:
        print(f"loaded {loaded} from {args.checkpoint}")
    elif ":" not in args.model:
        print(f"warning: no --checkpoint: zoo model {args.model!r} has random initial weights (seeded with --seed "
              f"{args.seed}); its plan and merge are those of an untrained network", file=sys.stderr)
    plan = _get_plan(args, model, example)
    n_before = sum(p.numel() for p in model.parameters())
    print(f"plan: {len(plan.groups)} coupled channel groups")
    if args.plan_out:
        plan.save(args.plan_out)
        print(f"wrote plan to {args.plan_out}")
    if args.out:
        dev = float(collapse(model, plan))
        small = merge(model, plan)
        n_after = sum(p.numel() for p in small.parameters())
        with torch.no_grad():
            diff = float((model(example) - small.eval()(example)).abs().max())
        save_checkpoint(args.out, model=small, plan=plan, rng=False,
                        extra={"model": args.model, "input_shape": list(shape), "merged": True})
        print(f"collapsed (largest intra-cluster deviation was {dev:.3g}); merged: params {n_before:,} -> "
              f"{n_after:,}; max |output difference| collapsed vs merged {diff:.3g}")
        print(f"wrote merged model to {args.out} (reload: csgd_ext.load_merged({args.out!r}, model))")
        if args.export != "none":
            res = export_merged(small, example, os.path.splitext(args.out)[0], args.export)
            print(f"deploy without csgd_ext: {summary(res)}")
    return 0


def register(sub) -> argparse.ArgumentParser:
    """Add the ``prune`` sub-command to the CLI's sub-parsers; returns its parser."""
    p = sub.add_parser("prune", help="plan clusters for your model; collapse and merge it into a smaller one",
                       description=DESCRIPTION)
    p.add_argument("--model", required=True,
                   help=f"package.module:factory or a zoo name ({', '.join(available_models())})")
    p.add_argument("--input-shape", required=True, help="C,H,W of one input, e.g. 3,32,32")
    p.add_argument("--keep", type=keep_fraction("--keep"), default=None,
                   help="fraction of channels kept per group, in (0, 1]")
    p.add_argument("--target-flops", type=keep_fraction("--target-flops"), default=None,
                   help="instead of --keep: the merged model's FLOPs as a fraction of the original's, in (0, 1]")
    p.add_argument("--round-to", type=positive_int("--round-to"), default=ROUND_TO, help=ROUND_TO_HELP)
    p.add_argument("--plan", default=None, help="use this plan (from --plan-out) instead of planning")
    p.add_argument("--plan-out", default=None, help="write the cluster plan here")
    p.add_argument("--checkpoint", default=None, help="weights to load before planning/merging")
    p.add_argument("--out", default=None, help="write the collapsed, merged model here (csgd_ext checkpoint)")
    p.add_argument("--num-classes", type=int, default=10, help="classes for a zoo model (default 10)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the k-means clustering and of a zoo model's random initial weights (default 0)")
    p.add_argument("--export", choices=EXPORT_CHOICES, default="all",
                   help="beside --out X.pt, also write X.pt2 (torch.export) and X.onnx (with the [export] extra): "
                        "all (default), pt2, or none")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p.set_defaults(func=run_prune)
    return p
