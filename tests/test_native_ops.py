"""The native op itself: schema, opcheck, torch.compile, argument errors, layout caching, no-copy paths."""

import pytest
import torch

import csgd_ext
from csgd_ext.optim import ops
from csgd_ext.optim.row_layout import build_layout

pytestmark = pytest.mark.skipif(csgd_ext.available_backends()["native"] is not None,
                                reason=f"native backend unavailable: {csgd_ext.available_backends()['native']}")

HP = dict(lr=0.1, momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.01, maximize=False, centripetal=0.3)


def native():
    mod = ops.native  # the module (its load_error, _register_fake, native_layout)
    assert mod.load_error() is None
    mod._register_fake()
    return mod


def op():
    native()
    return torch.ops.csgd_ext.csgd_step_.default


def _args(first=False, momentum=0.9, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    ps = [torch.randn(6, 4, generator=gen, dtype=dtype), torch.randn(5, dtype=dtype),
          torch.randn(4, 2, 3, 3, generator=gen, dtype=dtype)]
    gs = [torch.randn_like(p) for p in ps]
    bufs = [torch.randn_like(p) for p in ps] if momentum != 0 else []
    lays = [native().native_layout(build_layout(torch.tensor([2, 0, 2, 5, 0, 0]))), None,
            native().native_layout(build_layout(torch.tensor([1, 1, 1, 1])))]
    return (ps, gs, bufs, lays, 0.1, 0.01, momentum, 0.0, momentum != 0, False, 0.3, first)


def test_schema_mutates_params_and_buffers_only():
    schema = op()._schema
    assert schema.name == "csgd_ext::csgd_step_"
    mutated = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    assert mutated == ["params", "momentum_buffers"]
    assert len(schema.returns) == 0


@pytest.mark.parametrize("first,momentum", [(False, 0.9), (True, 0.9), (False, 0.0)])
def test_opcheck(first, momentum):
    torch.library.opcheck(op(), _args(first, momentum))


def test_opcheck_half():
    torch.library.opcheck(op(), _args(dtype=torch.bfloat16))


def test_torch_compile_training_step_matches_eager():
    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
                                   torch.nn.Flatten(), torch.nn.Linear(6 * 4 * 4, 3))

    runs = []
    for compiled in (False, True):
        net = make()
        ids = torch.tensor([0, 1, 1, 0, 2, 2])
        opt = csgd_ext.CSGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3,
                            centripetal=0.1, backend="native",
                            clusters={net[0].weight: ids, net[0].bias: ids, net[1].weight: ids, net[1].bias: ids})
        x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))

        def train_step():
            opt.zero_grad()
            loss = net(x).square().mean()
            loss.backward()
            opt.step()
            return loss

        fn = torch.compile(train_step, backend="aot_eager", fullgraph=False) if compiled else train_step
        losses = [fn().detach() for _ in range(4)]
        runs.append((losses, [p.detach().clone() for p in net.parameters()],
                     [opt.state[p]["momentum_buffer"].clone() for p in net.parameters()]))
    (l0, p0, b0), (l1, p1, b1) = runs
    torch.testing.assert_close(torch.stack(l0), torch.stack(l1))
    for x, y in zip(p0 + b0, p1 + b1):
        torch.testing.assert_close(x, y)


def test_compiled_functional_step_uses_fake_kernel():
    """The op traces under fake tensors (register_fake) and the compiled graph mutates the inputs."""
    mod = native()
    lay = build_layout(torch.tensor([0, 0, 1]))
    w, g = torch.randn(3, 4), torch.randn(3, 4)
    q = w.clone()
    b, bq = torch.zeros(3, 4), torch.zeros(3, 4)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def f(w, g, b):
        torch.ops.csgd_ext.csgd_step_([w], [g], [b], [mod.native_layout(lay)], 0.1, 0.0, 0.9, 0.0, False, False,
                                      0.5, False)

    f(w, g, b)
    bufs = [bq]
    mod.step([q], [g], bufs, [lay], lr=0.1, weight_decay=0.0, momentum=0.9, dampening=0.0, nesterov=False,
             maximize=False, centripetal=0.5)
    assert torch.equal(w, q) and torch.equal(b, bq)


def test_native_layout_is_cached_and_rebuilt_on_set_clusters():
    mod = native()
    p = torch.nn.Parameter(torch.randn(4, 3))
    p.grad = torch.randn(4, 3)
    opt = csgd_ext.CSGD([p], lr=0.1, backend="native", clusters={p: torch.tensor([0, 0, 1, 1])})
    opt.step()
    lay = opt.layout(p)
    t = lay.extras["native"]
    assert t.tolist() == [0, 2, 4, 0, 1, 2, 3]
    opt.step()
    assert opt.layout(p) is lay and lay.extras["native"] is t  # built once, reused every step
    opt.set_clusters({p: torch.tensor([1, 0, 1, 0])})
    opt.step()
    assert opt.layout(p).extras["native"].tolist() == [0, 2, 4, 1, 3, 0, 2]
    assert mod.native_layout(opt.layout(p)) is opt.layout(p).extras["native"]


def test_non_row_dense_param_takes_a_documented_copy():
    base = torch.randn(5, 7)
    w = base.t()  # rows of w are strided: not one dense block each
    assert not w.is_contiguous()
    q = w.clone()
    g = torch.randn(7, 5)
    lay = build_layout(torch.tensor([0, 1, 0, 2, 2, 1, 3]))
    ba, bb = [None], [None]
    native().step([w], [g], ba, [lay], **HP)
    ops.get("reference").step([q], [g], bb, [lay], **HP)
    torch.testing.assert_close(w, q)  # updated through the view, in place in `base`
    torch.testing.assert_close(base.t(), q)
    torch.testing.assert_close(ba[0], bb[0])


def test_grad_in_another_memory_format_is_accepted():
    w = torch.randn(4, 3, 2, 2).contiguous(memory_format=torch.channels_last)
    q = w.clone()
    g = torch.randn(4, 3, 2, 2)  # contiguous grad for a channels_last param
    lay = build_layout(torch.tensor([0, 0, 1, 1]))
    ba, bb = [None], [None]
    native().step([w], [g], ba, [lay], **HP)
    ops.get("reference").step([q], [g], bb, [lay], **HP)
    torch.testing.assert_close(w, q)
    assert w.is_contiguous(memory_format=torch.channels_last)


def test_op_argument_errors_name_the_offender():
    f = op()
    ps, gs, bufs, lays, *rest = _args()
    with pytest.raises(ValueError, match="grads has 2 tensors but params has 3"):
        f(ps, gs[:2], bufs, lays, *rest)
    with pytest.raises(ValueError, match="momentum_buffers has 0 tensors"):
        f(ps, gs, [], lays, *rest)
    with pytest.raises(ValueError, match=r"grads\[1\]"):
        f(ps, [gs[0], gs[1].double(), gs[2]], bufs, lays, *rest)
    with pytest.raises(ValueError, match=r"params\[0\].*not row-dense"):
        f([ps[0].t().contiguous().t()[:, :3]] + ps[1:], [gs[0][:, :3]] + gs[1:], [bufs[0][:, :3]] + bufs[1:],
          lays, *rest)
    with pytest.raises(ValueError, match=r"layouts\[0\]"):
        f(ps, gs, bufs, [lays[2], None, lays[2]], *rest)
    with pytest.raises(ValueError, match=r"layouts\[2\] must be a contiguous 1-D int64"):
        f(ps, gs, bufs, [lays[0], None, lays[2].int()], *rest)
    with pytest.raises(ValueError, match="nesterov requires momentum"):
        f(ps, gs, [], lays, 0.1, 0.0, 0.0, 0.0, True, False, 0.0, False)
    with pytest.raises(TypeError, match="float32, float64, float16, bfloat16"):
        f([torch.zeros(3, dtype=torch.int32)], [torch.zeros(3, dtype=torch.int32)], [], [None],
          0.1, 0.0, 0.0, 0.0, False, False, 0.0, False)


@pytest.mark.parametrize("corrupt, message", [
    (lambda off, perm: perm.__setitem__(3, perm[1].item()), r"layouts\[2\] lists row \d+ twice"),
    (lambda off, perm: perm.__setitem__(0, -1), r"layouts\[2\] has row index -1 out of range \[0, 8\)"),
    (lambda off, perm: perm.__setitem__(7, 8), r"layouts\[2\] has row index 8 out of range \[0, 8\)"),
    (lambda off, perm: off.__setitem__(2, off[1].item()), r"layouts\[2\] offsets are not strictly increasing"),
    (lambda off, perm: off.__setitem__(-1, 7), r"layouts\[2\] offsets must start at 0 and end at the row count 8"),
])
def test_a_corrupt_layout_is_refused_before_any_write(corrupt, message):
    # the kernel's fast layout check (marks, no per-cluster branches) must catch what the slow walk names
    f = op()
    ps, gs, bufs, lays, *rest = _args()
    ps[2], gs[2], bufs[2] = torch.randn(8, 3), torch.randn(8, 3), torch.randn(8, 3)
    lay = native().native_layout(build_layout(torch.tensor([0, 1, 0, 2, 1, 3, 3, 2]))).clone()
    off, perm = lay[:5], lay[5:]
    corrupt(off, perm)
    before = [t.clone() for t in ps + bufs]
    with pytest.raises(ValueError, match=message):
        f(ps, gs, bufs, [lays[0], None, lay], *rest)
    assert all(torch.equal(a, b) for a, b in zip(before, ps + bufs))


def test_mixed_dtypes_in_one_list_are_grouped_by_the_wrapper():
    ps = [torch.randn(4, 3), torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.bfloat16)]
    qs = [p.clone() for p in ps]
    gs = [torch.randn_like(p) for p in ps]
    lays = [build_layout(torch.tensor([0, 0, 1, 2]))] * 3
    ba, bb = [None] * 3, [None] * 3
    native().step(ps, gs, ba, lays, **HP)
    ops.get("reference").step(qs, gs, bb, lays, **HP)
    for p, q in zip(ps + ba, qs + bb):
        torch.testing.assert_close(p, q)


def test_empty_and_zero_row_tensors():
    ps = [torch.randn(0, 3), torch.randn(3)]
    gs = [torch.randn(0, 3), torch.randn(3)]
    bufs = [None, None]
    native().step(ps, gs, bufs, [None, build_layout(torch.tensor([0, 0, 1]))], **HP)
    assert bufs[0].shape == (0, 3) and bufs[1].shape == (3,)


def test_build_info_reports_the_cpu_kernel():
    info = native().build_info()
    assert info["cuda"] in ("0", "1")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("csgd_ext::csgd_step_", "CPU")
