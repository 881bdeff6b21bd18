"""Property-based fuzzing (hypothesis): random layouts, shapes, dtypes and hyperparameters through every
available backend against the reference, and the reference against a naive per-row transcription of the
update rule. Derandomized (the same examples on every run) and bounded in examples and wall time for CI."""

import math
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import csgd_ext
from tests.conftest import cpu_backends

I64_MAX, I64_MIN = torch.iinfo(torch.int64).max, torch.iinfo(torch.int64).min
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# results are rounded to the parameter dtype once per step; a 1-ulp difference in an fp32 intermediate
# (fused multiply-add, summation order) can flip that rounding, so allow a few ulps of the stored dtype
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-6),
       torch.float16: dict(rtol=4e-3, atol=4e-3), torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}
BUDGET_S = {"native": 25.0, "triton": 40.0}  # wall-time cap per backend (examples after it are skipped)
EXAMPLES = {"native": 60, "triton": 20}


@st.composite
def tensors_case(draw, max_rows=10, max_cols=5):
    """One parameter: shape, dtype, ids (or None: unclustered) and its gradients for each step."""
    n = draw(st.integers(0, max_rows))
    tail = draw(st.sampled_from([(), (1,), (3,), (2, 2), (0,)]))
    if tail and tail[0] > 0:
        tail = (draw(st.integers(1, max_cols)),) + tail[1:]
    shape = (n,) + tail
    clustered = draw(st.booleans()) if n > 0 else draw(st.just(True))
    ids = None
    if clustered:
        pool = draw(st.sampled_from(["dense", "sparse", "extreme"]))
        if pool == "dense":
            raw = draw(st.lists(st.integers(0, max(n - 1, 0)), min_size=n, max_size=n))
        elif pool == "sparse":
            raw = draw(st.lists(st.integers(-10 ** 12, 10 ** 12), min_size=n, max_size=n))
        else:
            raw = draw(st.lists(st.sampled_from([I64_MIN, -1, 0, I64_MAX]), min_size=n, max_size=n))
        ids = torch.tensor(raw, dtype=torch.int64)
    return shape, ids


@st.composite
def step_case(draw, max_rows=10, max_cols=5, max_params=3):
    params = draw(st.lists(tensors_case(max_rows, max_cols), min_size=1, max_size=max_params))
    momentum = draw(st.sampled_from([0.0, 0.5, 0.9]))
    nesterov = momentum > 0 and draw(st.booleans())
    hp = dict(lr=draw(st.sampled_from([0.0, 1e-3, 0.1, 0.7])), momentum=momentum,
              dampening=0.0 if nesterov else draw(st.sampled_from([0.0, 0.3])),
              weight_decay=draw(st.sampled_from([0.0, 1e-4, 0.05])), nesterov=nesterov,
              maximize=draw(st.booleans()), centripetal=draw(st.sampled_from([0.0, 3e-3, 0.5, 2.0])))
    dtype = draw(st.sampled_from(DTYPES))
    steps = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2 ** 16))
    return params, hp, dtype, steps, seed


def run(backend, params, hp, dtype, steps, seed):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(shape, generator=g).to(dtype)) for shape, _ in params]
    grads = [[torch.randn(shape, generator=g).to(dtype) for shape, _ in params] for _ in range(steps)]
    clusters = {p: ids for p, (_, ids) in zip(ps, params) if ids is not None}
    opt = csgd_ext.CSGD(ps, backend=backend, clusters=clusters, **hp)
    for gs in grads:
        for p, gr in zip(ps, gs):
            p.grad = gr
        opt.step()
    bufs = [opt.state[p].get("momentum_buffer") for p in ps]
    return [p.detach() for p in ps], bufs


_FUZZ_BACKENDS = [b for b in cpu_backends() if b != "reference"]


@pytest.mark.skipif(not _FUZZ_BACKENDS, reason="only the reference backend is available here (no native "
                    "build, no Triton interpreter): nothing to fuzz against it")
@pytest.mark.parametrize("backend", _FUZZ_BACKENDS)
def test_backend_matches_reference(backend):
    small = backend == "triton"  # the Triton interpreter is slow: tiny tensors
    start, ran = time.monotonic(), []

    @settings(max_examples=EXAMPLES.get(backend, 40), deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(step_case(max_rows=6 if small else 10, max_cols=3 if small else 5, max_params=2 if small else 3))
    def check(case):
        if time.monotonic() - start > BUDGET_S.get(backend, 25.0):
            return  # the CI time budget is spent; hypothesis still reports the examples that ran
        params, hp, dtype, steps, seed = case
        got_w, got_b = run(backend, *case)
        want_w, want_b = run("reference", *case)
        for i, (a, b) in enumerate(zip(got_w, want_w)):
            assert a.dtype == dtype and a.shape == b.shape
            torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m: f"param {i} {params[i]} {hp}: {m}")
        for a, b in zip(got_b, want_b):
            assert (a is None) == (b is None)
            if a is not None:
                assert a.dtype == dtype
                torch.testing.assert_close(a, b, **TOL[dtype])
        ran.append(1)

    check()
    print(f"{backend}: {len(ran)} fuzz examples in {time.monotonic() - start:.1f} s")
    assert len(ran) >= 5, f"only {len(ran)} fuzz examples ran within the time budget"


def naive_step(w, g, buf, ids, *, lr, momentum, dampening, weight_decay, nesterov, maximize, centripetal):
    """The update rule (csgd_ext/ops/reference.py's docstring) transcribed row by row with Python dicts (float64):
    the reference's own oracle."""
    n, cols = w.shape[0], math.prod(w.shape[1:])
    w2, g2 = w.reshape(n, cols), g.reshape(n, cols)
    if maximize:
        g2 = -g2
    d = torch.empty_like(w2)
    members = {}
    for i in range(n):
        members.setdefault(int(ids[i]) if ids is not None else i, []).append(i)
    for rows in members.values():
        gm = sum(g2[j] for j in rows) / len(rows)
        wm = sum(w2[j] for j in rows) / len(rows)
        for i in rows:
            if ids is None:
                d[i] = g2[i] + weight_decay * w2[i]
            else:
                d[i] = gm + weight_decay * w2[i] + centripetal * (w2[i] - wm)
    if momentum != 0:
        buf = d.clone() if buf is None else momentum * buf + (1 - dampening) * d
        d = d + momentum * buf if nesterov else buf
    return (w2 - lr * d).reshape(w.shape), buf


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(step_case(max_rows=8, max_cols=4, max_params=1))
def test_reference_matches_naive_rule(case):
    (params, hp, _, steps, seed) = case
    (shape, ids), = params
    got_w, got_b = run("reference", params, hp, torch.float64, steps, seed)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=torch.float32).double()
    grads = [torch.randn(shape, generator=g, dtype=torch.float32).double() for _ in range(steps)]
    buf = None
    for gr in grads:
        w, buf = naive_step(w, gr, buf, ids, **hp)
    torch.testing.assert_close(got_w[0], w, rtol=1e-10, atol=1e-12)
    if hp["momentum"] != 0:
        torch.testing.assert_close(got_b[0], buf.reshape(shape), rtol=1e-10, atol=1e-12)
