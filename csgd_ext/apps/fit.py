"""``python -m csgd_ext fit``: the whole job on your model and your images, in one command.

Plan clusters (``--keep``), evaluate the starting model, train with C-SGD (the demo's recipe: Nesterov momentum,
cosine LR), collapse, merge, verify; write ``OUT/merged.pt`` (reload it with ``csgd_ext.load_merged``),
``merged.pt2`` and ``merged.onnx`` (the merged model without csgd_ext: :mod:`csgd_ext.apps.export`), ``plan.json``,
``checkpoint.pt`` (atomic, at every epoch end), ``report.json``, ``report.md`` and plots. The report and the last
lines printed give the CPU latency of the starting and the merged model in NCHW and channels-last. ``--round-to``
defaults to 8 (``--round-to 1``: no rounding).

A run killed at any moment resumes with ``--resume`` and ends with the same merged weights, bit for bit, as an
uninterrupted run on the same machine: everything random in an epoch (data order, augmentation, dropout) is drawn
from (seed, epoch), and a partial epoch is redone from its start. ``report.json`` says where a run resumed
(``resumed_from``: the epoch and optimizer step of its checkpoint) and how many optimizer steps this process ran
(``optimizer_steps``); under ``torchrun`` it also gives the world size and, per epoch and rank, how many samples
the rank's sampler gave it and a SHA-256 of their indices in order (``data_shards``). Without ``--resume`` or ``--force`` an ``OUT``
that holds files is refused and left untouched. Bad input is one ``error:`` line, exit status 2, nothing written.

Example::

    python -m csgd_ext fit --model resnet20 --data digits --out fit_out --epochs 2
    python -m csgd_ext fit --model mypkg.nets:make_net --data ~/images --out fit_out --keep 0.5 --image-size 64
"""

from __future__ import annotations

import argparse
import copy
import os
import hashlib
import glob
import sys
import time
from typing import Any, Dict

import torch

from csgd_ext.training.checkpoint import load_checkpoint, save_checkpoint
from csgd_ext.merging.merge import merge, merge_report
from csgd_ext.training.monitor import collapse, deviation
from csgd_ext.optim.ops import resolve as resolve_backend
from csgd_ext.plan.records import ClusterPlan
from csgd_ext.planning.planner import plan_clusters
from csgd_ext.measure.latency import measure_latency_layouts
from csgd_ext.measure.progress import progress
from csgd_ext.training.loop import predict, train_model
from csgd_ext.apps.args import CLIError, first_line, keep_fraction, non_negative_float, non_negative_int, \
    positive_float, positive_int
from csgd_ext.apps.export import EXPORT_CHOICES, export_merged, summary
from csgd_ext.apps.fit_data import load_data
from csgd_ext.apps.fit_model import build_model
from csgd_ext.apps.fit_report import write_report
from csgd_ext.apps.prune import ROUND_TO, ROUND_TO_HELP, plan_round_to
from csgd_ext.apps.recipes import cosine, make_csgd, set_determinism

__all__ = ["register", "run_fit", "OUTPUTS"]

OUTPUTS = ("merged.pt", "plan.json", "checkpoint.pt", "report.json", "report.md")
DEPLOY = ("merged.pt2", "merged.onnx")
#: rounds of the base-vs-merged CPU latency timing (per layout, the two models alternating)
LATENCY_REPEATS = 20
LAYOUT_NAMES = {"nchw": "NCHW", "channels_last": "channels-last"}
PLOTS = ("training.png", "widths.png")
#: the options a checkpoint must share with a --resume run (everything that changes the result)
RESUME_KEYS = ("model", "data", "keep", "target_flops", "round_to", "epochs", "batch_size", "lr", "centripetal",
               "seed", "weights", "num_classes", "image_size", "amp", "device")
DESCRIPTION = ("Plan, train with C-SGD, collapse and merge your own model on your own images (an ImageFolder "
               "directory, or 'digits'), with resume, a report and plots.")


def _options(args) -> Dict[str, Any]:
    return {k: getattr(args, k) for k in RESUME_KEYS}


def _check_out(args) -> None:
    out = args.out
    if os.path.exists(out) and not os.path.isdir(out):
        raise CLIError(f"--out: {out!r} exists and is not a directory")
    if args.resume:
        if not os.path.isfile(os.path.join(out, "checkpoint.pt")):
            raise CLIError(f"--resume: no checkpoint at {os.path.join(out, 'checkpoint.pt')!r}")
        return
    if os.path.isdir(out) and os.listdir(out) and not args.force:
        raise CLIError(f"--out: {out!r} already holds files; pass --resume to continue its run or --force to "
                       "start over there")


def _plan_kwargs(args) -> Dict[str, Any]:
    if args.keep is not None and args.target_flops is not None:
        raise CLIError("--keep and --target-flops: give one of them, not both")
    return {"keep": args.keep, "seed": args.seed, "target_flops": args.target_flops,
            "round_to": plan_round_to(args.round_to)}


def _autocast(args):
    if not args.amp:
        return None, None
    if args.device == "cuda":
        return torch.float16, torch.amp.GradScaler("cuda")
    return torch.bfloat16, None


def _distributed(args):
    """``(rank, world size)``; under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is set up (gloo on CPU,
    nccl on CUDA) and ``--batch-size`` is the global batch, split evenly over the ranks."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if args.batch_size % world:
        raise CLIError(f"--batch-size {args.batch_size} is the global batch: it must divide over {world} processes")
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), world


def _shard(loader) -> Dict[str, Any]:
    """What a rank's sampler gives it in an epoch: the number of samples and a SHA-256 of their indices in order."""
    indices = [int(i) for batch in loader.batch_sampler for i in batch]
    return {"samples": len(indices), "sha256": hashlib.sha256(",".join(map(str, indices)).encode()).hexdigest()}


def _all_ranks(obj, world: int) -> list:
    """``obj`` of every rank, in rank order (``[obj]`` for one process)."""
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _end_follower_rank() -> None:
    """End a rank other than 0 once training is over, skipping the interpreter's teardown (it has nothing to write).

    DDP's hooks keep the gloo process group alive after ``destroy_process_group`` (its reference count never drops
    to zero, even with the model deleted), so gloo's worker threads outlive ``main``. A worker that drops the last
    reference to a tensor Python made (``all_gather_object``'s) after teardown has begun cannot take the GIL: the
    process aborts with "terminate called without an active exception" and torchrun fails the whole run. Seen on 1
    in 4 two-rank runs on a busy 2-core machine (``tests/test_fit.py::test_torchrun_two_gloo_ranks_match_one_process``);
    pytorch/pytorch#179291 describes the same race."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _clear_interrupted_writes(out: str) -> None:
    """Temporary files of atomic writes a killed run left in ``out`` (they never replaced a finished file)."""
    for name in OUTPUTS:
        for tmp in glob.glob(os.path.join(out, f".{name}.*.tmp")) + glob.glob(os.path.join(out, f"{name}.tmp")):
            os.remove(tmp)


def _sizes_line(s: dict) -> str:
    return (f"params {s['params_before']:,} -> {s['params_after']:,}, "
            f"FLOPs {s['flops_before']:,} -> {s['flops_after']:,} "
            f"(-{100 * (1 - s['flops_after'] / s['flops_before']):.1f} %)")


def _versions() -> Dict[str, Any]:
    import platform

    from csgd_ext.version import __version__

    try:
        import PIL
    except ImportError:  # --data digits needs no Pillow
        PIL = None
    return {"python": platform.python_version(), "torch": torch.__version__, "csgd_ext": __version__,
            "pillow": getattr(PIL, "__version__", None)}


def _say(args, text: str) -> None:
    if not args.quiet:
        print(text, flush=True)


def _resume_options(args) -> dict:
    """The checkpoint of ``--resume`` read, its options checked against this run's (the first that differs is
    named); returns the checkpoint's payload."""
    from csgd_ext.training.checkpoint import read_checkpoint

    try:
        payload = read_checkpoint(os.path.join(args.out, "checkpoint.pt"))
    except (ValueError, OSError) as e:
        raise CLIError(f"--resume: {first_line(e)}") from None
    saved = dict((payload.get("extra") or {}).get("options", {}))
    if "round_to" in saved and saved["round_to"] is None:  # a run from before --round-to 8 was the default
        saved["round_to"] = 1  # (no rounding: the same plan)
    for k in RESUME_KEYS:
        if saved.get(k) != getattr(args, k):
            raise CLIError(f"--resume: the checkpoint was made with --{k.replace('_', '-')} {saved.get(k)!r}, "
                           f"not {getattr(args, k)!r}")
    return payload


def _start_out(out: str) -> None:
    """The run's first write: ``out`` created, and the outputs of an earlier run there (``--force``) removed, so
    none of them can be taken for this run's."""
    os.makedirs(out, exist_ok=True)
    for name in OUTPUTS + DEPLOY + PLOTS:
        if os.path.isfile(os.path.join(out, name)):
            os.remove(os.path.join(out, name))


def _latency(base, merged, example, threads: int) -> Dict[str, Any]:
    """CPU latency of the starting and the merged model on one example, in NCHW and channels-last: medians of
    ``LATENCY_REPEATS`` rounds, the two models alternating round by round (:mod:`csgd_ext.measure.latency`)."""
    models = {"base": copy.deepcopy(base).cpu(), "merged": copy.deepcopy(merged).cpu()}
    res = measure_latency_layouts(models, example.cpu(), repeats=LATENCY_REPEATS, warmup=3, threads=threads)
    out: Dict[str, Any] = {"batch": int(example.shape[0]), "threads": threads, "repeats": LATENCY_REPEATS}
    for layout, r in res.items():
        out[layout] = {"base_ms": r["base"]["median_ms"], "merged_ms": r["merged"]["median_ms"]}
    return out


def latency_line(lat: Dict[str, Any]) -> str:
    """``report["latency"]`` in one line: base -> merged per layout, with the speed-up."""
    parts = [f"{LAYOUT_NAMES[k]} {lat[k]['base_ms']:.3g} ms -> {lat[k]['merged_ms']:.3g} ms "
             f"(x{lat[k]['base_ms'] / lat[k]['merged_ms']:.2f})" for k in LAYOUT_NAMES if k in lat]
    return (f"CPU latency base -> merged (batch {lat['batch']}, {lat['threads']} thread"
            f"{'' if lat['threads'] == 1 else 's'}, interleaved medians): " + "; ".join(parts))


class _Validation:
    """Validation accuracy (%) and logits of a model, one pass over the val images with a progress bar."""

    def __init__(self, data, batch_size: int, show: bool):
        self.loader = data.val_loader(batch_size)
        self.show = show and sys.stderr.isatty()  # in a log the epoch line says it all
        self.targets = torch.tensor([label for _, label in data.val.items])

    def __call__(self, model, desc: str):
        logits = predict(model, progress(self.loader, desc=desc, enabled=self.show))
        return 100.0 * int((logits.argmax(1) == self.targets).sum()) / len(self.targets), logits


def run_fit(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available here")
    if args.backend != "auto":
        try:
            resolve_backend(args.backend, torch.device(args.device))
        except (ValueError, RuntimeError) as e:  # unavailable here: say why
            raise CLIError(f"--backend {args.backend}: {first_line(e)}") from None
    rank, world = _distributed(args)
    _check_out(args)
    plan_kw = _plan_kwargs(args)
    payload = _resume_options(args) if args.resume else None  # checked before anything else is done
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # every rank has checked everything before rank 0 writes
    lead = rank == 0
    args.quiet = args.quiet or not lead
    show = not args.quiet
    set_determinism(args.seed, args.threads)
    data = load_data(args.data, args.image_size, args.seed, args.workers)
    size = data.image_size
    _say(args, f"image size: {size} ({data.size_reason})")
    model, rebuild = build_model(args.model, data.channels, len(data.classes), args.num_classes, args.weights,
                                 args.seed)
    device = torch.device(args.device)
    model = model.to(device)
    example = torch.zeros(1, data.channels, size, size, device=device)
    validate = _Validation(data, max(args.batch_size, 64), show)
    ck_path, plan_path = os.path.join(args.out, "checkpoint.pt"), os.path.join(args.out, "plan.json")
    history: Dict[str, list] = {"epoch": [], "train_loss": [], "val_acc": [], "deviation": []}
    if payload is not None:  # the plan the run was trained with, embedded in its checkpoint
        plan = ClusterPlan.from_dict(payload["plan"], model, source=f"file {ck_path!r}")
    else:
        _say(args, f"data: {data.description}\nmodel: {args.model} ({sum(p.numel() for p in model.parameters()):,} "
                   "parameters)")
        bar = progress(total=1, desc="plan", enabled=show)
        try:
            plan = plan_clusters(model, example, **plan_kw)
        except Exception as e:  # noqa: BLE001 - a model the planner cannot take, an unreachable target: one line
            bar.close()
            raise CLIError(f"planning failed: {type(e).__name__}: {first_line(e)}") from None
        bar.update(1)
        bar.close()
    base_model = copy.deepcopy(model)
    sizes = merge_report(model, plan, example)  # params and FLOPs before and after the merge
    opt = make_csgd(plan, args.lr, 1e-4, args.centripetal, 1.0, args.backend)
    steps_per_epoch = len(data.train_loader(args.batch_size, 0, rank, world))
    wrapped = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model)  # gradients averaged over the ranks before each step
    sched = cosine(opt, args.epochs * steps_per_epoch)
    dtype, scaler = _autocast(args)

    def checkpoint(epoch: int) -> None:  # atomic; the plan is embedded, plan.json is for the user
        save_checkpoint(ck_path, model=model, optimizer=opt, plan=plan, scheduler=sched, scaler=scaler,
                        step=epoch * steps_per_epoch, rng=False,
                        extra={"epoch": epoch, "options": _options(args), "val_acc_base": val_acc_base,
                               "history": history})

    if payload is not None:
        ck = load_checkpoint(ck_path, model=model, optimizer=opt, scheduler=sched, scaler=scaler, restore_rng=False)
        extra = ck.extra or {}
        start, val_acc_base, history = int(extra["epoch"]), extra["val_acc_base"], extra["history"]
        if lead:
            _clear_interrupted_writes(args.out)
            if not os.path.isfile(plan_path):  # killed between the checkpoint and plan.json
                plan.save(plan_path)
        resumed_from = {"epoch": start, "step": start * steps_per_epoch}
        _say(args, f"resuming after epoch {start} of {args.epochs} (optimizer step {resumed_from['step']})")
    else:
        start, resumed_from = 0, None
        _say(args, f"{plan.summary()}\n{_sizes_line(sizes)}")
        val_acc_base = validate(model, "val: starting model")[0] if lead else None
        if lead:  # the first write: everything before it was checked
            _start_out(args.out)
            checkpoint(0)  # a run killed in its first epoch resumes from here
            plan.save(plan_path)
    t_train = time.perf_counter()
    steps_run, shards = 0, []
    for epoch in range(start, args.epochs):
        torch.manual_seed(args.seed * 1000 + epoch)  # dropout and anything else random: from (seed, epoch)
        model.train()
        loader = data.train_loader(args.batch_size, epoch, rank, world)
        state = train_model(wrapped, loader, opt, epochs=1, scheduler=sched, scaler=scaler, autocast=dtype,
                            progress=show, desc=f"C-SGD epoch {epoch + 1}/{args.epochs}")
        steps_run += state.step
        shards.append({"epoch": epoch + 1, "ranks": _all_ranks(_shard(loader), world)})
        if not lead:  # rank 0 evaluates and writes; the others go on training
            continue
        acc = validate(model, f"val: epoch {epoch + 1}")[0]
        dev = float(deviation(model, plan))
        losses = state.history["loss"]
        history["epoch"].append(epoch + 1)
        history["train_loss"].append(float(sum(losses) / max(1, len(losses))))
        history["val_acc"].append(acc)
        history["deviation"].append(dev)
        checkpoint(epoch + 1)
        eta = (time.perf_counter() - t_train) / (epoch + 1 - start) * (args.epochs - epoch - 1)
        _say(args, f"epoch {epoch + 1}/{args.epochs}: train loss {history['train_loss'][-1]:.4f}, val acc "
                   f"{acc:.2f} %, cluster deviation {dev:.3g}, {time.perf_counter() - t0:.0f} s, ETA {eta:.0f} s")
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    if not lead:
        _end_follower_rank()
    val_acc_csgd = history["val_acc"][-1]
    bar = progress(total=2, desc="collapse + merge", enabled=show)
    deviation_final = float(collapse(model, plan))
    bar.update(1)
    small = merge(model, plan)
    bar.update(1)
    bar.close()
    collapsed_logits = validate(model, "val: collapsed model")[1]
    val_acc_merged, merged_logits = validate(small, "val: merged model")
    save_checkpoint(os.path.join(args.out, "merged.pt"), model=small, plan=plan, rng=False)
    exports = export_merged(copy.deepcopy(small).cpu(), example.cpu(), os.path.join(args.out, "merged"), args.export)
    latency = _latency(base_model, small, example, args.threads)
    report = {
        "model": args.model, "data": data.description, "classes": data.classes, "epochs": args.epochs,
        "seed": args.seed, "keep": plan.meta.get("keep"), "target_flops": args.target_flops,
        "round_to": args.round_to,
        **{k: sizes[k] for k in ("params_before", "params_after", "flops_before", "flops_after")},
        "val_acc_base": val_acc_base, "val_acc_csgd": val_acc_csgd, "val_acc_merged": val_acc_merged,
        "max_logit_diff": float((collapsed_logits - merged_logits).abs().max()),
        "deviation_final": deviation_final, "wall_s": time.perf_counter() - t0,
        "image_size": size, "n_val": len(data.val), "history": history, "reload": rebuild,
        "exports": exports, "latency": latency,
        "resumed_from": resumed_from, "optimizer_steps": steps_run, "world_size": world, "data_shards": shards,
        "versions": _versions(),
    }
    write_report(args.out, report, plan, base_model, small)
    _say(args, latency_line(latency))
    _say(args, f"val accuracy: base {val_acc_base:.2f} %, C-SGD {val_acc_csgd:.2f} %, merged {val_acc_merged:.2f} %; "
               f"{_sizes_line(sizes)}; max logit "
               f"difference {report['max_logit_diff']:.3g}; {report['wall_s']:.0f} s; {steps_run} optimizer steps in this "
               f"process" + (f" (resumed after epoch {start})" if resumed_from else "") + f"\nwrote {args.out}/: "
               f"{', '.join(OUTPUTS)} and plots; reload: {rebuild}"
               + (f"\ndeploy without csgd_ext: {summary(exports)}" if exports else ""))
    return 0


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("fit", help="plan + C-SGD training + merge of your own model on your own images",
                       description=DESCRIPTION, allow_abbrev=False)
    p.add_argument("--model", required=True, help="a zoo name, torchvision:NAME, timm:NAME or package.module:factory")
    p.add_argument("--data", required=True, help="an ImageFolder directory (train/ and val/, or class folders), "
                                                 "or 'digits' (the embedded MNIST digits)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--keep", type=keep_fraction("--keep"), default=None, help="fraction of channels kept (default 0.625)")
    p.add_argument("--target-flops", type=keep_fraction("--target-flops"), default=None,
                   help="FLOPs of the merged model as a fraction of the original's, instead of --keep")
    p.add_argument("--round-to", type=positive_int("--round-to"), default=ROUND_TO,
                   help=ROUND_TO_HELP)
    p.add_argument("--epochs", type=positive_int("--epochs"), default=3)
    p.add_argument("--batch-size", type=positive_int("--batch-size"), default=64)
    p.add_argument("--lr", type=positive_float("--lr"), default=0.05)
    p.add_argument("--centripetal", type=non_negative_float("--centripetal"), default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", default=None, help="a state dict or csgd_ext checkpoint to start from")
    p.add_argument("--num-classes", type=positive_int("--num-classes"), default=None,
                   help="replace the classifier when its classes differ from the data's")
    p.add_argument("--image-size", type=positive_int("--image-size"), default=None,
                   help="training and validation image size (default: the images' own when they all share one "
                        "size, 28 for digits, else 224)")
    p.add_argument("--workers", type=non_negative_int("--workers"), default=0, help="DataLoader worker processes")
    p.add_argument("--threads", type=positive_int("--threads"), default=1, help="intra-op CPU threads")
    p.add_argument("--backend", default="auto", choices=["auto", "native", "triton", "cuda", "reference"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--amp", action="store_true", help="bf16 autocast on CPU, fp16 + GradScaler on CUDA")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--export", choices=EXPORT_CHOICES, default="all",
                   help="also write merged.pt2 (torch.export) and merged.onnx (with the [export] extra): all "
                        "(default), pt2, or none")
    p.add_argument("--force", action="store_true", help="start over in an OUT that holds files")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    p.set_defaults(func=_dispatch)
    return p


def _dispatch(args) -> int:
    if args.backend == "cuda":
        args.backend = "native"  # the native extension's CUDA kernel
    return run_fit(args)
