"""Bad input raises ValueError/TypeError that names the parameter or hyperparameter."""

import pytest
import torch

import csgd_ext
from csgd_ext import BackendUnavailableError


def _params():
    torch.manual_seed(0)
    return torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(3))


@pytest.mark.parametrize("kw,match", [
    (dict(lr=-0.1), "Invalid lr"),
    (dict(momentum=-0.5), "Invalid momentum"),
    (dict(centripetal=-1e-3), "Invalid centripetal"),
    (dict(weight_decay=-1.0), "Invalid weight_decay"),
    (dict(lr=float("nan")), "Invalid lr"),
    (dict(nesterov=True), "Nesterov"),
    (dict(nesterov=True, momentum=0.9, dampening=0.1), "Nesterov"),
])
def test_bad_hyperparameters(kw, match):
    w, _ = _params()
    kw = {"lr": 0.1, **kw}
    with pytest.raises(ValueError, match=match):
        csgd_ext.CSGD([w], **kw)


def test_bad_group_hyperparameter_names_the_group():
    w, b = _params()
    with pytest.raises(ValueError, match=r"Invalid centripetal.*param group 1"):
        csgd_ext.CSGD([{"params": [w]}, {"params": [b], "centripetal": -1.0}], lr=0.1)
    with pytest.raises(TypeError, match="nesterov must be a bool"):
        csgd_ext.CSGD([{"params": [w], "nesterov": "yes"}], lr=0.1, momentum=0.9)


def test_ids_wrong_length_names_parameter():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3))
    w = model[0].weight
    with pytest.raises(ValueError, match=r"'0\.weight'.*length 5.*6 rows"):
        csgd_ext.CSGD(model.named_parameters(), lr=0.1, clusters={w: torch.arange(5)})
    with pytest.raises(ValueError, match=r"parameter #0 of param group 0 \(shape \(6, 3, 3, 3\)\)"):
        csgd_ext.CSGD(model.parameters(), lr=0.1, clusters={w: torch.arange(5)})


def test_ids_wrong_dtype_or_shape():
    w, _ = _params()
    with pytest.raises(TypeError, match="integer dtype.*float32"):
        csgd_ext.CSGD([w], lr=0.1, clusters={w: torch.zeros(6)})
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        csgd_ext.CSGD([w], lr=0.1, clusters={w: [0, 0, 1, 1, 2, 2]})
    with pytest.raises(ValueError, match="1-D"):
        csgd_ext.CSGD([w], lr=0.1, clusters={w: torch.zeros(6, 1, dtype=torch.long)})
    with pytest.raises(ValueError, match="0-dim"):
        s = torch.nn.Parameter(torch.tensor(1.0))
        csgd_ext.CSGD([s], lr=0.1, clusters={s: torch.zeros(1, dtype=torch.long)})


def test_ids_wrong_device():
    w, _ = _params()
    with pytest.raises(ValueError, match="are on meta but the parameter is on cpu"):
        csgd_ext.CSGD([w], lr=0.1, clusters={w: torch.zeros(6, dtype=torch.long, device="meta")})


def test_parameter_clustered_twice():
    model = torch.nn.Linear(4, 6)
    ids = torch.zeros(6, dtype=torch.long)
    with pytest.raises(ValueError, match=r"'weight'.*clustered twice"):
        csgd_ext.CSGD(model.named_parameters(), lr=0.1, clusters=[(model.weight, ids), ("weight", ids)])


def test_cluster_key_not_in_params():
    w, b = _params()
    with pytest.raises(ValueError, match=r"shape \(3,\).*not one of the optimizer's parameters"):
        csgd_ext.CSGD([w], lr=0.1, clusters={b: torch.zeros(3, dtype=torch.long)})
    with pytest.raises(ValueError, match="'nope'.*not a named parameter"):
        csgd_ext.CSGD([("w", w)], lr=0.1, clusters={"nope": torch.zeros(6, dtype=torch.long)})


def test_sparse_gradient_names_parameter():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = csgd_ext.CSGD(emb.named_parameters(), lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match="sparse gradients.*'weight'"):
        opt.step()


def test_unknown_backend():
    w, _ = _params()
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        csgd_ext.CSGD([w], lr=0.1, backend="fast")


def test_unavailable_backend_says_why():
    assert csgd_ext.available_backends()["reference"] is None
    # no backend but the reference has kernels for the meta device: asking for one by name says why
    w = torch.nn.Parameter(torch.empty(6, 4, device="meta"))
    with pytest.raises(BackendUnavailableError, match="backend 'triton' is unavailable on meta: .+"):
        csgd_ext.CSGD([w], lr=0.1, backend="triton")


def test_shape_change_after_clustering_is_reported():
    w = torch.nn.Parameter(torch.randn(6, 2))
    opt = csgd_ext.CSGD([w], lr=0.1, clusters={w: torch.tensor([0, 0, 1, 1, 2, 2])})
    w.grad = torch.zeros_like(w)
    opt.step()
    w.data = torch.randn(3, 2)  # surgery behind the optimizer's back
    w.grad = torch.zeros_like(w)
    with pytest.raises(ValueError, match="changed shape"):
        opt.step()
