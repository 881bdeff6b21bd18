"""C-SGD step backends behind one signature, in one visible table.

Every backend module registers one :class:`Backend` in :data:`BACKENDS` when it is imported (below, in order);
an optional dependency (the compiled extension, Triton) is imported inside the backend, where its absence
becomes :attr:`Backend.unavailable_reason` instead of an import error. Each ``step``::

    step(params, grads, momentum_buffers, layouts, hp) -> None

updates ``params`` (and the momentum buffers) in place; ``hp`` is the step's
:class:`csgd_ext.optim.hparams.HParams` (``step(..., lr=0.1, momentum=0.9)`` with the hyperparameters as
keywords works too). A ``None`` buffer is a first step and the new buffer is stored back into the list when
``momentum != 0``. ``layouts[i]`` is a :class:`csgd_ext.optim.row_layout.ClusterLayout` or ``None`` (plain SGD).

========================  =========================================================================
backend                   what runs
========================  =========================================================================
``reference``             :mod:`.reference`: the update rule in plain PyTorch, the spec
``native``                :mod:`.native`: the C++ kernel on CPU, the CUDA kernel on GPU (``csgd_ext._C``)
``triton``                :mod:`.triton_backend`: the Triton kernels (GPU; CPU only under ``TRITON_INTERPRET=1``)
``cuda_emulated``         :mod:`.cuda_emulated`: the CUDA kernel's device code on CPU tensors (testing only)
========================  =========================================================================

``"auto"`` picks, per device type, the first usable backend of :data:`AUTO_ORDER`. ``python -m csgd_ext info``
prints this table with each backend's status.

How the fast paths work (``reference``'s docstring is the spec of the update rule, with the official C-SGD code's
names mapped to ours): one pass over the weights. A program (or OpenMP task) owns one cluster and one block of
columns: it reads the members' ``g`` and ``w`` once to form the two means, then writes every member's new ``w``
and momentum buffer, the same memory traffic per element as fused momentum SGD (read ``w, g, b``; write
``w, b``). The cluster layout (members sorted by cluster, CSR offsets) is built once per assignment and cached;
unclustered parameters go through the same op as all-singleton rows. Reductions run in a fixed order (no
atomics): same inputs, same bits. fp16/bf16 parameters are computed in fp32 and rounded once. Each backend's
internals are in its module's docstring; the measured and modelled step times are in ``benchmarks/README.md``.
"""

from csgd_ext.optim.ops.registry import AUTO_ORDER, BACKENDS, Backend, BackendUnavailableError, available_backends, \
    get, register, resolve
# The backends, each registering itself in BACKENDS (the order is the table's order).
from csgd_ext.optim.ops import reference, native, triton_backend, cuda_emulated  # noqa: E402,F401

__all__ = ["Backend", "BACKENDS", "AUTO_ORDER", "BackendUnavailableError", "register", "get", "resolve",
           "available_backends"]
