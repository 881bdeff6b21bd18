"""CPU latency helper: statistics, eval/inference mode, thread count, interleaved comparison, errors."""

import time

import pytest
import torch
from torch import nn

from csgd_ext.measure.latency import measure_latency, measure_latency_interleaved, summarize_times


class Sleeper(nn.Module):
    """Records the mode it ran in; sleeps ``ms`` per forward (a lower bound no machine load can break)."""

    def __init__(self, ms):
        super().__init__()
        self.ms = ms
        self.bn = nn.BatchNorm1d(3)
        self.seen = []

    def forward(self, x):
        self.seen.append((self.training, torch.is_inference_mode_enabled(), torch.get_num_threads()))
        time.sleep(self.ms / 1e3)
        return self.bn(x)


def test_summary_statistics():
    s = summarize_times([5.0, 1.0, 4.0, 2.0, 3.0, 10.0, 6.0, 7.0, 8.0, 9.0, 0.0])
    assert s["median_ms"] == 5.0 and s["p10_ms"] == pytest.approx(1.0) and s["p90_ms"] == pytest.approx(9.0)
    assert s["min_ms"] == 0.0 and s["max_ms"] == 10.0 and s["mean_ms"] == pytest.approx(5.0)
    with pytest.raises(ValueError, match="empty"):
        summarize_times([])


def test_measure_latency_modes_threads_and_bounds():
    model = Sleeper(2.0).train()
    threads_before = torch.get_num_threads()
    r = measure_latency(model, torch.randn(4, 3), repeats=5, warmup=2, threads=1)
    assert len(model.seen) == 7 and all(s == (False, True, 1) for s in model.seen)
    assert model.training and model.bn.training                      # restored
    assert torch.get_num_threads() == threads_before
    assert r["min_ms"] >= 2.0 and r["p10_ms"] <= r["median_ms"] <= r["p90_ms"] <= r["max_ms"]
    assert (r["repeats"], r["warmup"], r["threads"], r["batch_size"], len(r["times_ms"])) == (5, 2, 1, 4, 5)
    assert model.bn.num_batches_tracked.item() == 0                  # eval: no BN statistics update


def test_interleaved_orders_models():
    fast, slow = Sleeper(1.0), Sleeper(6.0)
    r = measure_latency_interleaved({"fast": fast, "slow": slow}, (torch.randn(2, 3),), repeats=5, warmup=1)
    assert r["slow"]["median_ms"] > r["fast"]["median_ms"]
    assert r["slow"]["min_ms"] >= 6.0
    assert len(fast.seen) == len(slow.seen) == 6


def test_real_conv_net_and_dict_inputs():
    class KW(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x)

    r = measure_latency(KW(), {"x": torch.randn(1, 3, 8, 8)}, repeats=3, warmup=0, threads=None)
    assert r["median_ms"] > 0 and r["threads"] == torch.get_num_threads()


def test_errors_name_the_argument():
    x = torch.randn(1, 3)
    with pytest.raises(ValueError, match="repeats"):
        measure_latency(Sleeper(0), x, repeats=0)
    with pytest.raises(TypeError, match="warmup"):
        measure_latency(Sleeper(0), x, warmup=1.5)
    with pytest.raises(ValueError, match="threads"):
        measure_latency(Sleeper(0), x, threads=0)
    with pytest.raises(TypeError, match="model 'b'"):
        measure_latency_interleaved({"a": Sleeper(0), "b": "resnet"}, x)
    with pytest.raises(TypeError, match="inputs"):
        measure_latency(Sleeper(0), 3, repeats=1, warmup=0)
