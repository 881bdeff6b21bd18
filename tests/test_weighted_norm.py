"""Weighted LayerNorm / RMSNorm (csgd_ext.norms): on an input whose channels are identical within each cluster,
the weighted norm of the kept channels equals the plain norm of the full input restricted to the kept channels;
all-ones counts give the plain norm; tracing/export, state-dict reload and input validation."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from csgd_ext.kinds.norms import WeightedLayerNorm, WeightedRMSNorm, check_counts

C = 23

# torch.jit.trace / script are deprecated in torch >= 2.9 but still supported; the test checks they still work.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")


class LayerNorm2d(nn.LayerNorm):
    """Channels-first LayerNorm as in torchvision / ConvNeXt: (N, C, H, W) -> normalize over C."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def clustering(seed, width=C):
    """Random clustering of ``width`` channels with random sizes (at least two singletons and one cluster of
    size >= 4). Returns (keep, counts, src): kept channel of each cluster (sorted), cluster sizes, and for every
    channel the kept channel whose value it copies."""
    g = torch.Generator().manual_seed(seed)
    sizes = [1, 1, 4]
    while sum(sizes) < width:
        sizes.append(int(torch.randint(1, 6, (), generator=g)))
    sizes[-1] -= sum(sizes) - width
    sizes = [s for s in sizes if s > 0]
    perm = torch.randperm(width, generator=g)
    src = torch.empty(width, dtype=torch.long)
    groups = []
    for members in torch.split(perm, sizes):
        first = int(members.min())
        src[members] = first
        groups.append((first, len(members)))
    groups.sort()
    keep = torch.tensor([k for k, _ in groups])
    counts = torch.tensor([n for _, n in groups])
    assert int(counts.sum()) == width and (counts == 1).sum() >= 2 and counts.max() >= 4
    return keep, counts, src


def collapsed_case(seed, channel_dim, dtype, offset=2.0):
    """Full input with identical channels per cluster, kept indices/counts, and affine params equal per cluster."""
    keep, counts, src = clustering(seed)
    g = torch.Generator().manual_seed(seed + 1000)
    shape = (3, 5, C) if channel_dim == -1 else (2, C, 3, 4)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + offset
    x = x.index_select(channel_dim, src)  # members identical to their first member
    w = torch.randn(C, generator=g, dtype=torch.float64)[src]
    b = torch.randn(C, generator=g, dtype=torch.float64)[src]
    return x.to(dtype), w.to(dtype), b.to(dtype), keep, counts


def ref_layer_norm(x, w, b, eps, channel_dim):
    if channel_dim == -1:
        return F.layer_norm(x, (x.shape[-1],), w, b, eps)
    return F.layer_norm(x.movedim(1, -1), (x.shape[1],), w, b, eps).movedim(-1, 1)


def ref_rms_norm(x, w, eps, channel_dim):
    if channel_dim == -1:
        return F.rms_norm(x, (x.shape[-1],), w, eps)
    return F.rms_norm(x.movedim(1, -1), (x.shape[1],), w, eps).movedim(-1, 1)


def weighted_ln(counts, w, b, keep, eps, channel_dim):
    m = WeightedLayerNorm(counts, eps=eps, channel_dim=channel_dim, dtype=w.dtype)
    with torch.no_grad():
        m.weight.copy_(w[keep])
        m.bias.copy_(b[keep])
    return m


TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channel_dim", [-1, 1])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_layer_norm_on_collapsed_input(seed, channel_dim, dtype):
    x, w, b, keep, counts = collapsed_case(seed, channel_dim, dtype)
    eps = 1e-6 if channel_dim == 1 else 1e-5
    expected = ref_layer_norm(x, w, b, eps, channel_dim).index_select(channel_dim, keep)
    m = weighted_ln(counts, w, b, keep, eps, channel_dim)
    got = m(x.index_select(channel_dim, keep))
    assert got.dtype == dtype and got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channel_dim", [-1, 1])
@pytest.mark.parametrize("eps", [None, 1e-6])
def test_rms_norm_on_collapsed_input(eps, channel_dim, dtype):
    x, w, _, keep, counts = collapsed_case(7, channel_dim, dtype)
    expected = ref_rms_norm(x, w, eps, channel_dim).index_select(channel_dim, keep)
    m = WeightedRMSNorm(counts, eps=eps, channel_dim=channel_dim, dtype=dtype)
    with torch.no_grad():
        m.weight.copy_(w[keep])
    got = m(x.index_select(channel_dim, keep))
    assert got.dtype == dtype
    torch.testing.assert_close(got, expected, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("channel_dim", [-1, 1])
def test_bfloat16_input_matches_fp32_result(channel_dim):
    # A large offset makes bf16 statistics fail visibly (ulp(50) = 0.25 in bf16): the mean/var must be fp32.
    x, w, b, keep, counts = collapsed_case(3, channel_dim, torch.float32, offset=50.0)
    xb = x.bfloat16()
    expected = ref_layer_norm(xb.float(), w, b, 1e-5, channel_dim).index_select(channel_dim, keep)
    m = weighted_ln(counts, w, b, keep, 1e-5, channel_dim)
    got = m(xb.index_select(channel_dim, keep))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, atol=2e-2, rtol=1e-2)  # ~2 bf16 ulps
    # Whole module in bf16 (counts <= 256 stay exact): agrees with nn.LayerNorm's bf16 kernel to ~1 ulp.
    mb = m.bfloat16()
    ref_b = ref_layer_norm(xb, w.bfloat16(), b.bfloat16(), 1e-5, channel_dim).index_select(channel_dim, keep)
    got_b = mb(xb.index_select(channel_dim, keep))
    assert got_b.dtype == torch.bfloat16
    torch.testing.assert_close(got_b.float(), ref_b.float(), atol=2e-2, rtol=1e-2)
    # RMSNorm (eps=None: fp32 machine eps, as nn.RMSNorm uses for bf16) on small-scale input where eps matters.
    xs = (x - x.mean()) * 1e-3
    xsb = xs.bfloat16()
    r_exp = ref_rms_norm(xsb.float(), w, None, channel_dim).index_select(channel_dim, keep)
    r = WeightedRMSNorm(counts, channel_dim=channel_dim)
    with torch.no_grad():
        r.weight.copy_(w[keep])
    r_got = r(xsb.index_select(channel_dim, keep))
    assert r_got.dtype == torch.bfloat16
    torch.testing.assert_close(r_got.float(), r_exp, atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_ones_counts_equal_plain_norms(dtype):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 6, C, generator=g, dtype=dtype) * 2 + 1
    ln = nn.LayerNorm(C, eps=1e-5, dtype=dtype)
    rms = nn.RMSNorm(C, dtype=dtype)
    with torch.no_grad():
        ln.weight.normal_(generator=g)
        ln.bias.normal_(generator=g)
        rms.weight.normal_(generator=g)
    wln = WeightedLayerNorm.from_norm(ln, torch.ones(C, dtype=torch.long), torch.arange(C))
    wrms = WeightedRMSNorm.from_norm(rms, [1] * C, torch.arange(C))
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    with torch.no_grad():
        torch.testing.assert_close(wln(x), ln(x), atol=tol, rtol=tol)
        torch.testing.assert_close(wrms(x), rms(x), atol=tol, rtol=tol)
        xs = x * 1e-4  # eps=None resolves like nn.RMSNorm's: visible at this scale
        torch.testing.assert_close(wrms(xs), rms(xs), atol=tol, rtol=tol)
        # No affine params, and LayerNorm without bias.
        ln_na = nn.LayerNorm(C, elementwise_affine=False, dtype=dtype)
        torch.testing.assert_close(WeightedLayerNorm.from_norm(ln_na, [1] * C, torch.arange(C))(x), ln_na(x),
                                   atol=tol, rtol=tol)
        ln_nb = nn.LayerNorm(C, bias=False, dtype=dtype)
        wnb = WeightedLayerNorm.from_norm(ln_nb, [1] * C, torch.arange(C))
        assert wnb.bias is None and wnb.weight is not None
        torch.testing.assert_close(wnb(x), ln_nb(x), atol=tol, rtol=tol)


def test_negative_controls_plain_norm_and_wrong_counts_do_not_match():
    x, w, b, keep, counts = collapsed_case(11, -1, torch.float32)
    expected = ref_layer_norm(x, w, b, 1e-5, -1)[..., keep]
    xk = x[..., keep]
    plain = F.layer_norm(xk, (len(keep),), w[keep], b[keep], 1e-5)
    assert (plain - expected).abs().max() > 1e-2
    shuffled = counts.flip(0)
    assert not torch.equal(shuffled, counts)
    wrong = weighted_ln(shuffled, w, b, keep, 1e-5, -1)(xk)
    assert (wrong - expected).abs().max() > 1e-2
    right = weighted_ln(counts, w, b, keep, 1e-5, -1)(xk)
    torch.testing.assert_close(right, expected, atol=1e-5, rtol=1e-5)
    r_expected = ref_rms_norm(x, w, None, -1)[..., keep]
    r_plain = F.rms_norm(xk, (len(keep),), w[keep])
    assert (r_plain - r_expected).abs().max() > 1e-2


def _modules():
    _, w, b, keep, counts = collapsed_case(4, 1, torch.float32)
    ln_last = weighted_ln(counts, w, b, keep, 1e-5, -1)
    ln_first = weighted_ln(counts, w, b, keep, 1e-6, 1)
    rms_none = WeightedRMSNorm(counts)
    rms_first = WeightedRMSNorm(counts, eps=1e-6, channel_dim=1)
    with torch.no_grad():
        rms_none.weight.copy_(w[keep])
        rms_first.weight.copy_(w[keep])
    k = len(keep)
    g = torch.Generator().manual_seed(9)
    last = lambda: torch.randn(2, 5, k, generator=g) * 1e-3  # noqa: E731  (small: eps=None matters)
    first = lambda: torch.randn(2, k, 3, 4, generator=g) + 1  # noqa: E731
    return {"ln_last": (ln_last, last), "ln_first": (ln_first, first), "rms_none": (rms_none, last),
            "rms_first": (rms_first, first)}


@pytest.mark.parametrize("name", ["ln_last", "ln_first", "rms_none", "rms_first"])
def test_fx_jit_trace_and_export_agree(name):
    m, make = _modules()[name]
    m.eval()
    example, fresh = make(), make()
    expected = m(fresh)
    gm = torch.fx.symbolic_trace(m)
    torch.testing.assert_close(gm(fresh), expected, atol=0, rtol=0)
    traced = torch.jit.trace(m, (example,))
    torch.testing.assert_close(traced(fresh), expected, atol=1e-7, rtol=1e-6)
    scripted = torch.jit.script(m)
    torch.testing.assert_close(scripted(fresh), expected, atol=1e-7, rtol=1e-6)
    if name in ("ln_first", "rms_none"):  # export is the slowest; one LN and one RMS variant cover the ops
        ep = torch.export.export(m, (example,))
        torch.testing.assert_close(ep.module()(fresh), expected, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("cls", [WeightedLayerNorm, WeightedRMSNorm])
def test_state_dict_round_trip_weights_only(tmp_path, cls):
    _, w, _, keep, counts = collapsed_case(6, 1, torch.float32)
    m = cls(counts, eps=1e-6, channel_dim=1)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
    sd = m.state_dict()
    assert "counts" in sd and sd["counts"].dtype == torch.float32 and torch.equal(sd["counts"], counts.float())
    torch.save(sd, tmp_path / "norm.pt")
    loaded = torch.load(tmp_path / "norm.pt", weights_only=True)
    fresh = cls(torch.ones(len(keep)), eps=1e-6, channel_dim=1)
    fresh.load_state_dict(loaded)
    assert torch.equal(fresh.counts, m.counts)
    x = torch.randn(2, len(keep), 3, 3)
    torch.testing.assert_close(fresh(x), m(x), atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="size mismatch"):
        cls(torch.ones(len(keep) + 1), eps=1e-6, channel_dim=1).load_state_dict(loaded)


def test_from_norm_layer_norm_channels_last():
    x, w, b, keep, counts = collapsed_case(8, -1, torch.float64)
    ln = nn.LayerNorm(C, eps=1e-4, dtype=torch.float64)
    with torch.no_grad():
        ln.weight.copy_(w)
        ln.bias.copy_(b)
    m = WeightedLayerNorm.from_norm(ln, counts, keep)
    assert m.eps == 1e-4 and m.channel_dim == -1 and m.width == len(keep)
    assert m.weight.dtype == torch.float64 and m.weight.device == ln.weight.device
    assert torch.equal(m.weight, w[keep]) and torch.equal(m.bias, b[keep])
    assert m.weight.data_ptr() != ln.weight.data_ptr()
    assert f"{len(keep)}, eps=0.0001, channel_dim=-1" in repr(m)
    with torch.no_grad():
        torch.testing.assert_close(m(x[..., keep]), ln(x)[..., keep], atol=1e-12, rtol=1e-12)


def test_from_norm_layer_norm2d_subclass_channels_first():
    x, w, b, keep, counts = collapsed_case(9, 1, torch.float32)
    ln2d = LayerNorm2d(C, eps=1e-6)
    with torch.no_grad():
        ln2d.weight.copy_(w)
        ln2d.bias.copy_(b)
    m = WeightedLayerNorm.from_norm(ln2d, counts.tolist(), keep, channel_dim=1)
    assert m.eps == 1e-6 and m.channel_dim == 1
    assert "channel_dim=1" in repr(m)
    with torch.no_grad():
        got = m(x[:, keep])
        torch.testing.assert_close(got, ln2d(x)[:, keep], atol=1e-5, rtol=1e-5)
    assert got.shape == (2, len(keep), 3, 4)


def test_from_norm_rms_norm():
    x, w, _, keep, counts = collapsed_case(10, -1, torch.float32)
    rms = nn.RMSNorm(C)
    with torch.no_grad():
        rms.weight.copy_(w)
    m = WeightedRMSNorm.from_norm(rms, counts, keep)
    assert m.eps is None and torch.equal(m.weight, w[keep])
    with torch.no_grad():
        torch.testing.assert_close(m(x[..., keep]), rms(x)[..., keep], atol=1e-5, rtol=1e-5)
    m2 = WeightedRMSNorm.from_norm(nn.RMSNorm(C, eps=1e-3, elementwise_affine=False), counts, keep)
    assert m2.eps == 1e-3 and m2.weight is None


@pytest.mark.parametrize("counts, exc, match", [
    ([], ValueError, "empty"),
    (torch.tensor([], dtype=torch.long), ValueError, "empty"),
    ([2, 0, 1], ValueError, "positive"),
    ([2, -1], ValueError, "positive"),
    ([1.5, 2.0], ValueError, "integer"),
    ([1.0, float("nan")], ValueError, "finite"),
    ([[1, 2], [3, 4]], ValueError, "1-D"),
    ([True, True], TypeError, "integers"),
    (["a", "b"], TypeError, "positive integers"),
    ("12", TypeError, "positive integers"),
    (None, TypeError, "positive integers"),
    ([2 ** 24, 2], ValueError, "exactly"),
])
def test_bad_counts(counts, exc, match):
    with pytest.raises(exc, match=match):
        check_counts(counts)
    with pytest.raises(exc, match=match):
        WeightedLayerNorm(counts)
    with pytest.raises(exc, match=match):
        WeightedRMSNorm(counts)


def test_check_counts_accepts_integer_like():
    assert torch.equal(check_counts(torch.tensor([2, 3, 1])), torch.tensor([2.0, 3.0, 1.0]))
    assert check_counts((1.0, 4.0)).dtype == torch.float32


@pytest.mark.parametrize("channel_dim", [0, 2, -2, 3, True, 1.0, "1", None])
def test_bad_channel_dim(channel_dim):
    with pytest.raises(ValueError, match="channel_dim must be -1 .* or 1"):
        WeightedLayerNorm([1, 2], channel_dim=channel_dim)
    with pytest.raises(ValueError, match="channel_dim"):
        WeightedRMSNorm([1, 2], channel_dim=channel_dim)
    with pytest.raises(ValueError, match="channel_dim"):
        WeightedLayerNorm.from_norm(nn.LayerNorm(3), [1, 2], torch.tensor([0, 2]), channel_dim=channel_dim)


def test_bad_from_norm_inputs():
    ln = nn.LayerNorm(5)
    with pytest.raises(ValueError, match=r"len\(counts\) = 2 != len\(keep_index\) = 3"):
        WeightedLayerNorm.from_norm(ln, [2, 3], torch.tensor([0, 2, 4]))
    with pytest.raises(ValueError, match="single channel dim"):
        WeightedLayerNorm.from_norm(nn.LayerNorm((4, 5)), [2, 2], torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="single channel dim"):
        WeightedRMSNorm.from_norm(nn.RMSNorm((4, 5)), [2, 2], torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"sum\(counts\) = 4 != the norm's width 5"):
        WeightedLayerNorm.from_norm(ln, [2, 2], torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        WeightedLayerNorm.from_norm(ln, [2, 3], torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="duplicate"):
        WeightedLayerNorm.from_norm(ln, [2, 3], torch.tensor([1, 1]))
    with pytest.raises(TypeError, match="integer channel indices"):
        WeightedLayerNorm.from_norm(ln, [2, 3], torch.tensor([0.0, 2.0]))
    with pytest.raises(TypeError, match="integer channel indices"):
        WeightedLayerNorm.from_norm(ln, [2, 3], torch.tensor([True, False, True, False, False]))
    with pytest.raises(TypeError, match="nn.LayerNorm|LayerNorm"):
        WeightedLayerNorm.from_norm(nn.BatchNorm1d(5), [2, 3], torch.tensor([0, 2]))
    with pytest.raises(TypeError, match="RMSNorm"):
        WeightedRMSNorm.from_norm(ln, [2, 3], torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="positive"):
        WeightedLayerNorm.from_norm(ln, [5, 0], torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="eps must be a non-negative"):
        WeightedLayerNorm([1, 2], eps=-1.0)
    with pytest.raises(ValueError, match="eps must be a non-negative"):
        WeightedRMSNorm([1, 2], eps=float("nan"))


# -- WeightedGroupNorm ------------------------------------------------------------------------------------
from csgd_ext.kinds.norms import WeightedGroupNorm  # noqa: E402


def _collapsed_groupnorm(dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    gn = nn.GroupNorm(3, 12).to(dtype)
    # every group keeps 3 channels: {0,1},{2},{3} | {4,5},{6},{7} | {8,11},{9},{10}
    clusters = [[0, 1], [2], [3], [4, 5], [6], [7], [8, 11], [9], [10]]
    with torch.no_grad():
        gn.weight.copy_(torch.randn(12, generator=g, dtype=dtype))
        gn.bias.copy_(torch.randn(12, generator=g, dtype=dtype))
        for c in clusters:
            gn.weight[c] = gn.weight[c[0]].clone()
            gn.bias[c] = gn.bias[c[0]].clone()
    x = torch.randn(2, 12, 4, 5, generator=g, dtype=dtype)
    for c in clusters:
        x[:, c] = x[:, c[0]:c[0] + 1].clone()
    keep = torch.tensor([c[0] for c in clusters])
    return gn, x, keep, [len(c) for c in clusters]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_weighted_groupnorm_equals_groupnorm_on_collapsed_inputs(dtype, tol):
    gn, x, keep, counts = _collapsed_groupnorm(dtype)
    wgn = WeightedGroupNorm.from_norm(gn, counts, keep)
    with torch.no_grad():
        assert (wgn(x[:, keep]) - gn(x)[:, keep]).abs().max().item() <= tol
        plain = F.group_norm(x[:, keep], 3, gn.weight[keep], gn.bias[keep], gn.eps)  # negative control
        assert (plain - gn(x)[:, keep]).abs().max().item() > 1e-2


def test_weighted_groupnorm_with_unit_counts_is_groupnorm_and_traces():
    gn = nn.GroupNorm(2, 6)
    wgn = WeightedGroupNorm.from_norm(gn, [1] * 6, torch.arange(6))
    x = torch.randn(3, 6, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(wgn(x), gn(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.fx.symbolic_trace(wgn)(x), wgn(x))
        torch.testing.assert_close(torch.export.export(wgn, (x,)).module()(x), wgn(x))


def test_weighted_groupnorm_rejects_bad_inputs():
    gn = nn.GroupNorm(2, 6)
    with pytest.raises(ValueError, match="same number of channels"):
        WeightedGroupNorm.from_norm(gn, [2, 1, 1, 2], torch.tensor([0, 1, 2, 3]))  # group 0 keeps 3, group 1 keeps 1
    with pytest.raises(ValueError, match="num_groups"):
        WeightedGroupNorm([1, 1, 1], num_groups=2)
    with pytest.raises(TypeError, match="GroupNorm"):
        WeightedGroupNorm.from_norm(nn.LayerNorm(6), [1] * 6, torch.arange(6))
