"""C-SGD and PyTorch's distributed engines: what works, what does not, and the check that says so.

Supported: ``torch.nn.parallel.DistributedDataParallel`` (any backend: gloo, nccl). DDP all-reduces (averages)
the gradients before ``CSGD.step``, so every rank applies the same update to the same full parameters and the
replicas stay identical; the result equals single-process training on the global batch (tested with 2 gloo
processes on CPU). Wrap the model in DDP, then build ``CSGD`` on ``ddp.module``'s (or ``ddp``'s) parameters
with the same ``clusters`` on every rank::

    ddp = DistributedDataParallel(model)
    opt = csgd_ext.CSGD(ddp.parameters(), lr=0.1, momentum=0.9, clusters=plan.clusters)

Not supported for *clustered* parameters (raises ``ValueError`` when clusters are set or loaded):

* FSDP2 (``fully_shard``) and tensor parallelism: parameters are ``DTensor`` shards; a cluster's rows can
  live on different ranks, so its mean would need a collective inside the optimizer step.
* FSDP1 (``FullyShardedDataParallel``): ``FlatParameter`` concatenates and shards many tensors; its rows are
  not output channels (and with ``use_orig_params=True`` the original parameters are views into it).
* ``ZeroRedundancyOptimizer(optimizer_class=CSGD, clusters=...)``: each rank's local optimizer holds only a
  partition of the parameters, so a rank given clusters for parameters it does not hold raises ``ValueError``.

Unclustered parameters of such models are plain SGD and are not checked here.

A whole DDP run (``tests/test_ddp.py`` checks it with 2 gloo processes on CPU: parameters bit-identical across
ranks and equal to single-process training on the global batch up to float summation order, ``rtol=1e-5``).
Give every rank the same clusters: plan once, share the plan file::

    # train_ddp.py
    import os, torch, torch.distributed as dist, torch.nn.functional as F
    import csgd_ext
    from csgd_ext.models import get_model

    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, local_rank = dist.get_rank(), int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    torch.manual_seed(0)                                    # same initial weights on every rank
    model = get_model("resnet20", num_classes=10, in_channels=1).to(device)
    if rank == 0:                                           # plan once; every rank loads the same file
        csgd_ext.plan_clusters(model, torch.randn(2, 1, 28, 28, device=device), keep=0.625).save("plan.json")
    dist.barrier()
    plan = csgd_ext.ClusterPlan.load("plan.json", model)
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None)
    opt = csgd_ext.CSGD(plan.param_groups(lr=0.05, weight_decay=1e-4, centripetal=3e-3), lr=0.05,
                        momentum=0.9, nesterov=True, clusters=plan.clusters)
    start = 0
    if os.path.exists("ckpt.pt"):                           # resume: every rank reads the same checkpoint
        start = csgd_ext.load_checkpoint("ckpt.pt", model=model, optimizer=opt).step
    for step in range(start, 20):
        x = torch.randn(8, 1, 28, 28, device=device)        # use a DataLoader with a DistributedSampler here
        y = torch.randint(0, 10, (8,), device=device)
        opt.zero_grad()
        F.cross_entropy(ddp(x), y).backward()               # DDP averages the gradients
        opt.step()
        if rank == 0 and (step + 1) % 10 == 0:              # rank 0 writes (DDP wrapper is unwrapped)
            csgd_ext.save_checkpoint("ckpt.pt", model=ddp, optimizer=opt, plan=plan, step=step + 1)
        dist.barrier()
    dist.destroy_process_group()

One machine: ``torchrun --standalone --nproc-per-node=2 train_ddp.py`` (run like this with gloo on CPU). Several
machines (run on each, ``NODE_RANK`` = 0..N-1, all pointing at one host reachable by the others; the files
``plan.json``/``ckpt.pt`` must be on a shared filesystem, or copied to every node)::

    torchrun --nnodes=2 --nproc-per-node=8 --node-rank=$NODE_RANK \\
             --rdzv-id=csgd-run --rdzv-backend=c10d --rdzv-endpoint=$MASTER_HOST:29500 train_ddp.py

A checkpoint written by rank 0 holds rank 0's RNG state; for a bit-identical resume of a multi-rank run, make
data order depend only on the step (a ``DistributedSampler`` with ``set_epoch``), or save one file per rank.
``python -m csgd_ext fit`` runs under ``torchrun`` the same way (``csgd_ext/apps/README.md``).
"""

from __future__ import annotations

import torch

__all__ = ["sharding_reason", "check_clusterable"]


def sharding_reason(p: torch.Tensor):
    """Why ``p`` cannot be clustered by C-SGD (a sharded / flattened distributed parameter), or None."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        DTensor = ()
    if DTensor and isinstance(p, DTensor):
        return ("it is a DTensor (FSDP2 fully_shard or tensor parallelism): its rows are sharded across ranks, "
                "so cluster means would need a collective; C-SGD clusters need full, replicated parameters "
                "(use DistributedDataParallel)")
    if getattr(p, "_is_flat_param", False) or type(p).__name__ == "FlatParameter":
        return ("it is an FSDP FlatParameter (many tensors flattened and sharded): its rows are not output "
                "channels; C-SGD clusters need full, replicated parameters (use DistributedDataParallel)")
    if getattr(p, "_fsdp_flattened", False):
        return ("it is managed by FSDP (a view into a sharded FlatParameter); C-SGD clusters need full, "
                "replicated parameters (use DistributedDataParallel)")
    return None


def check_clusterable(p: torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` naming ``name`` when ``p`` is a sharded distributed parameter (see module doc)."""
    why = sharding_reason(p)
    if why is not None:
        raise ValueError(f"{name} cannot be clustered: {why}")
