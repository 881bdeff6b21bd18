"""Clusters along another dim (``clusters={p: (ids, dim)}``): a position embedding (1, tokens, channels) clusters
its channels, dim 2. Each backend must step it exactly as it steps the same values laid out channels-first."""

import io

import pytest
import torch

import csgd_ext
from csgd_ext.optim import ops

BACKENDS = list(ops.BACKENDS)
HP = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3, centripetal=0.5)


def _available(backend):
    try:
        ops.resolve(backend, torch.device("cpu"))
        return True
    except Exception:  # noqa: BLE001 - not built / not importable here
        return False


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dim2_clusters_step_like_the_channels_first_layout(backend, dtype, monkeypatch):
    if not _available(backend):
        pytest.skip(f"backend {backend} is not available here")
    if backend == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    g = torch.Generator().manual_seed(0)
    tokens, ch = 5, 7
    ids = torch.tensor([0, 1, 0, 2, 1, 1, 3])
    pos = torch.nn.Parameter(torch.randn(1, tokens, ch, generator=g, dtype=dtype))
    ref = torch.nn.Parameter(pos.detach()[0].t().clone())  # (channels, tokens): dim 0 clusters
    a = csgd_ext.CSGD([pos], clusters={pos: (ids, 2)}, backend=backend, **HP)
    b = csgd_ext.CSGD([ref], clusters={ref: ids}, backend="reference", **HP)
    for _ in range(6):
        grad = torch.randn(ch, tokens, generator=g, dtype=dtype)
        pos.grad, ref.grad = grad.t().unsqueeze(0).clone(), grad.clone()
        a.step(), b.step()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(pos.detach()[0].t(), ref.detach(), rtol=tol, atol=tol)
    buf = a.state[pos]["momentum_buffer"]
    assert buf.shape == pos.shape
    torch.testing.assert_close(buf[0].t(), b.state[ref]["momentum_buffer"], rtol=tol, atol=tol)


def test_dim_clusters_survive_a_state_dict_round_trip_and_bad_dims_are_refused():
    pos = torch.nn.Parameter(torch.randn(1, 3, 4))
    ids = torch.tensor([0, 0, 1, 1])
    opt = csgd_ext.CSGD([pos], lr=0.1, momentum=0.9, centripetal=0.1, clusters={pos: (ids, 2)})
    pos.grad = torch.randn_like(pos)
    opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    opt2 = csgd_ext.CSGD([pos], lr=0.1, momentum=0.9, centripetal=0.1)
    opt2.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert opt2.layout(pos).num_rows == 4 and torch.equal(opt2.clusters[pos], ids)
    with pytest.raises(ValueError, match="length 4 but the parameter has 3 rows"):
        csgd_ext.CSGD([pos], lr=0.1, clusters={pos: (ids, 1)})
    with pytest.raises(ValueError, match="out of range"):
        csgd_ext.CSGD([pos], lr=0.1, clusters={pos: (ids, 3)})
    with pytest.raises(TypeError, match="must be an int"):
        csgd_ext.CSGD([pos], lr=0.1, clusters={pos: (ids, "2")})
