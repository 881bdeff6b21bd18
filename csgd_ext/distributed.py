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
