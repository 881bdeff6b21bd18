"""C-SGD maths: analytic properties of the update and an independent dense merge-matrix formulation."""

import copy

import pytest
import torch
import torch.nn.functional as F

import csgd_ext
from nets import batches, make_model


def _ids(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.arange(k), torch.randint(0, k, (n - k,), generator=g)])
    return ids[torch.randperm(n, generator=g)] * 7 + 3  # unsorted, with gaps


def _row_dev(w, ids):
    w2 = w.reshape(w.shape[0], -1)
    return max((w2[ids == c] - w2[ids == c].mean(0)).abs().max().item() for c in ids.unique())


def test_identical_members_stay_identical(backend):
    torch.manual_seed(0)
    model = make_model()
    ids = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3])
    with torch.no_grad():  # make each cluster's members identical
        for p in (model.conv1.weight, model.conv1.bias, model.bn1.weight, model.bn1.bias):
            first = torch.stack([p[(ids == ids[i]).nonzero()[0, 0]] for i in range(8)])
            p.copy_(first)
    clusters = {p: ids for p in (model.conv1.weight, model.conv1.bias, model.bn1.weight, model.bn1.bias)}
    opt = csgd_ext.CSGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3,
                        centripetal=0.1, clusters=clusters, backend=backend)
    for x, y in batches(20):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        assert _row_dev(model.conv1.weight.grad, ids) > 0  # gradients differ within clusters...
        opt.step()
    for p in clusters:  # ...but the members do not: bitwise identical to their cluster's first member
        w2 = p.detach().reshape(8, -1)
        for c in ids.unique():
            members = w2[ids == c]
            assert torch.equal(members, members[:1].expand_as(members))


@pytest.mark.parametrize("lr,wd,c", [(0.1, 0.0, 0.5), (0.05, 1e-2, 1.0), (0.2, 1e-3, 0.0)])
def test_deviation_decays_geometrically(lr, wd, c, backend):
    torch.manual_seed(1)
    w = torch.nn.Parameter(torch.randn(10, 3, 3, 3, dtype=torch.float64))
    ids = _ids(10, 4, seed=2)
    opt = csgd_ext.CSGD([w], lr=lr, weight_decay=wd, centripetal=c, clusters={w: ids}, backend=backend)
    mean0 = {int(k): w.detach()[ids == k].mean(0) for k in ids.unique()}
    dev0 = torch.stack([w.detach()[i] - mean0[int(ids[i])] for i in range(10)])
    factor = 1 - lr * (wd + c)
    for t in range(1, 16):
        w.grad = torch.zeros_like(w)
        opt.step()
        mean = {int(k): w.detach()[ids == k].mean(0) for k in ids.unique()}
        dev = torch.stack([w.detach()[i] - mean[int(ids[i])] for i in range(10)])
        torch.testing.assert_close(dev, dev0 * factor ** t, rtol=1e-10, atol=1e-12)
        # the mean itself only feels weight decay when the gradient is zero
        for k in mean:
            torch.testing.assert_close(mean[k], mean0[k] * (1 - lr * wd) ** t, rtol=1e-10, atol=1e-12)


def test_cluster_mean_follows_sgd_on_mean_gradient(backend):
    torch.manual_seed(3)
    n, k = 12, 5
    ids = _ids(n, k, seed=4)
    w = torch.nn.Parameter(torch.randn(n, 6, dtype=torch.float64))
    opt = csgd_ext.CSGD([w], lr=0.07, momentum=0.9, dampening=0.1, weight_decay=1e-2, centripetal=0.3,
                        clusters={w: ids}, backend=backend)
    # the same hyperparameters on the k cluster means with the mean gradient: plain SGD
    labels = torch.unique(ids, return_inverse=True)[1]
    onehot = F.one_hot(labels, k).double()
    avg = (onehot / onehot.sum(0)).T  # k x n averaging matrix
    means = torch.nn.Parameter(avg @ w.detach())
    sgd = torch.optim.SGD([means], lr=0.07, momentum=0.9, dampening=0.1, weight_decay=1e-2)
    for _ in range(25):
        g = torch.randn(n, 6, dtype=torch.float64)
        w.grad = g.clone()
        means.grad = avg @ g
        opt.step()
        sgd.step()
        torch.testing.assert_close(avg @ w.detach(), means.detach(), rtol=1e-10, atol=1e-12)


def _dense_official(w, g, ids, wd, c):
    """The official code's transform: merge matrix M (1/|C| within a cluster) and decay matrix D,
    g' = M g + D w with D = wd * I + c * (I - M); written here independently of the package."""
    n = w.shape[0]
    same = (ids[:, None] == ids[None, :]).to(w.dtype)
    M = same / same.sum(1, keepdim=True)
    eye = torch.eye(n, dtype=w.dtype)
    D = wd * eye + c * (eye - M)
    return (M @ g.reshape(n, -1) + D @ w.reshape(n, -1)).reshape(w.shape)


@pytest.mark.parametrize("nesterov", [False, True])
def test_random_multilayer_matches_dense_merge_matrix(nesterov, backend):
    torch.manual_seed(5)
    model = make_model(dtype=torch.float64)
    ref = copy.deepcopy(model)
    clusters, ref_ids = {}, {}
    for i, (name, p) in enumerate(model.named_parameters()):
        if name.startswith("fc"):
            continue
        ids = _ids(p.shape[0], max(1, p.shape[0] // 2 - i % 3), seed=10 + i)
        clusters[p] = ids
        ref_ids[name] = ids
    hp = dict(lr=0.03, momentum=0.9, nesterov=nesterov, dampening=0.0)
    opt = csgd_ext.CSGD(model.parameters(), weight_decay=1e-3, centripetal=0.2, clusters=clusters,
                        backend=backend, **hp)
    # reference: per-layer dense transform then a stock SGD step without weight decay
    ref_params = dict(ref.named_parameters())
    sgd = torch.optim.SGD(ref.parameters(), **hp)
    for x, y in batches(20, dtype=torch.float64):
        for m in (model, ref):
            m.zero_grad()
            F.cross_entropy(m(x), y).backward()
        with torch.no_grad():
            for name, p in ref_params.items():
                if name in ref_ids:
                    p.grad.copy_(_dense_official(p, p.grad, ref_ids[name], 1e-3, 0.2))
                else:
                    p.grad.add_(p, alpha=1e-3)
        opt.step()
        sgd.step()
    for (name, a), b in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11, msg=lambda m: f"{name}: {m}")
