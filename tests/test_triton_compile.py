"""The Triton step as seen by ``torch.compile``: the custom op ``csgd_ext::triton_step`` passes
``torch.library.opcheck``, a compiled step traces with ``fullgraph=True`` (no graph break) and matches eager.

On CPU the kernels run in Triton's interpreter and the compiler is ``aot_eager`` (functionalization and
AOT autograd, no code generation); the ``gpu`` test runs the default compiler (Inductor) on CUDA.
"""

import os

import pytest
import torch

import csgd_ext
from csgd_ext.optim.row_layout import build_layout
from csgd_ext.optim.ops import reference
from csgd_ext.optim.ops import triton_backend as tb

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(tb.unavailable_reason(torch.device(DEV)) is not None,
                                reason=f"triton backend unavailable: {tb.unavailable_reason(torch.device(DEV))}")

HP = dict(lr=0.1, momentum=0.9, dampening=0.0, nesterov=True, weight_decay=1e-2, maximize=False, centripetal=0.3)
# one tensor per row-width class: short (clustered, 5 columns), vec (1 column), flat (unclustered), long
SPECS = [((6, 5), [0, 0, 1, 2, 2, 2]), ((6,), [3, 1, 3, 1, 1, 0]), ((4, 3), None), ((3, 260), [0, 1, 0])]


def _problem(seed=0, device=DEV):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=g).to(device) for s, _ in SPECS]
    lays = [None if ids is None else build_layout(torch.tensor(ids, device=device)) for _, ids in SPECS]
    grads = [[torch.randn(s, generator=g).to(device) for s, _ in SPECS] for _ in range(4)]
    return ps, lays, grads


def _op_args(ps, gs, bufs, first, lays):
    return (ps, gs, bufs, first, [None if l is None else l.perm for l in lays],
            [None if l is None else l.offsets for l in lays], [0 if l is None else l.max_size for l in lays])


def test_opcheck_first_and_later_steps():
    ps, lays, grads = _problem()
    bufs = [torch.randn_like(p) for p in ps]
    for first in ([True] * 4, [False, True, False, False]):
        args = _op_args([p.clone() for p in ps], grads[0], [b.clone() for b in bufs], first, lays)
        torch.library.opcheck(torch.ops.csgd_ext.triton_step.default, args, HP,
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                          "test_aot_dispatch_dynamic"))
    # without momentum: no buffers
    args = _op_args([p.clone() for p in ps], grads[0], [], [], lays)
    torch.library.opcheck(torch.ops.csgd_ext.triton_step.default, args, dict(HP, momentum=0.0, nesterov=False))


def test_op_matches_reference():
    ps, lays, grads = _problem(1)
    qs = [p.clone() for p in ps]
    bufs = [torch.empty_like(p) for p in ps]
    rbufs = [None] * len(ps)
    for s in range(3):
        torch.ops.csgd_ext.triton_step(*_op_args(ps, grads[s], bufs, [s == 0] * len(ps), lays), **HP)
        reference.step(qs, grads[s], rbufs, lays, **HP)
    for a, b in zip(ps + bufs, qs + rbufs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _compiled_functional_step(compiler):
    ps, lays, grads = _problem(2)
    eager = [p.clone() for p in ps]
    ebufs, cbufs = [None] * len(ps), [None] * len(ps)

    def fn(params, gs, bufs):
        tb.step(params, gs, bufs, lays, **HP)

    cfn = torch.compile(fn, backend=compiler, fullgraph=True)  # fullgraph: a graph break is an error
    for s in range(4):
        tb.step(eager, grads[s], ebufs, lays, **HP)
        cfn(ps, grads[s], cbufs)  # step 0 allocates the buffers in the graph, later steps reuse them
    for a, b in zip(ps + cbufs, eager + ebufs):
        assert b is not None
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compiled_functional_step_fullgraph_matches_eager():
    torch._dynamo.reset()
    _compiled_functional_step("aot_eager")


def _net(device):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.BatchNorm1d(6), torch.nn.ReLU(),
                               torch.nn.Linear(6, 3)).to(device)


def _compiled_training_matches_eager(compiler, device):
    torch._dynamo.reset()
    nets = [_net(device), _net(device)]
    ids = torch.tensor([0, 0, 1, 2, 2, 2], device=device)
    opts = [csgd_ext.CSGD(n.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3, centripetal=0.1,
                          clusters={n[0].weight: ids, n[0].bias: ids, n[1].weight: ids}, backend="triton")
            for n in nets]

    def train_step(net, opt, x):
        opt.zero_grad()
        loss = net(x).square().mean()
        loss.backward()
        opt.step()
        return loss

    ctrain = torch.compile(train_step, backend=compiler)
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(8, 5, generator=g).to(device) for _ in range(4)]
    for x in xs[:2]:  # the first steps build the layouts and pick the backend (eager code, graph breaks)
        train_step(nets[0], opts[0], x)
        ctrain(nets[1], opts[1], x)
    # from then on the optimizer step is one graph: fullgraph=True fails on any graph break
    cstep = torch.compile(opts[1].step, backend=compiler, fullgraph=True)
    for x in xs[2:]:
        train_step(nets[0], opts[0], x)
        opts[1].zero_grad()
        nets[1](x).square().mean().backward()
        cstep()
    for (name, a), b in zip(nets[0].named_parameters(), nets[1].parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(opts[1].state[b]["momentum_buffer"], opts[0].state[a]["momentum_buffer"],
                                   rtol=1e-5, atol=1e-6)


def test_compiled_training_step_aot_eager_matches_eager():
    _compiled_training_matches_eager("aot_eager", DEV)


@pytest.mark.gpu
def test_gpu_compiled_training_step_inductor_matches_eager():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set: this test checks the compiled kernel under Inductor")
    _compiled_training_matches_eager("inductor", "cuda")
    torch._dynamo.reset()
    _compiled_functional_step("inductor")
