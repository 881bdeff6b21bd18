"""Stage 1, the optimizer: :class:`CSGD` over the functional :func:`csgd`, and the backends that run its step.

* :mod:`.csgd` -- ``CSGD`` (the ``torch.optim.Optimizer``) and ``csgd()`` (one step over lists of tensors);
* :mod:`.hparams` -- the step's hyperparameters, one record;
* :mod:`.row_layout` -- :class:`ClusterLayout`, the rows of a parameter grouped by cluster, as the kernels read them;
* :mod:`.cluster_ids` -- the per-parameter cluster ids ``CSGD`` takes, kept in its state;
* :mod:`.step_cache` -- a param group's tensors batched per device between steps;
* :mod:`.distributed` -- which distributed engines C-SGD works with;
* :mod:`.ops` -- the backends (``reference`` is the spec; ``native``, ``triton``, ``cuda_emulated``).

Imports nothing else of the package.
"""
