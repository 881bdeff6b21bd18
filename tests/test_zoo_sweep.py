"""benchmarks/zoo_sweep.py on tiny in-repo nets (no torchvision/timm needed): a merge is exact and smaller,
torch-pruning's count is beside it, and a model that fails to build or to run gets a one-line reason in its row
instead of stopping the sweep; the markdown names every model."""

import os
import sys

import pytest
import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import zoo_sweep  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.BatchNorm2d(16), nn.ReLU())
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


class BrokenForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        raise RuntimeError("this forward always fails\nsecond line that must not appear")


def _broken_builder():
    raise ValueError("no such model\nsecond line")


def _small():
    torch.manual_seed(0)
    return zoo_sweep.Spec(SmallNet(), inputs=[torch.randn(1, 3, 16, 16)])


def test_sweep_rows_and_markdown():
    models = {"small_conv": _small, "broken_build": _broken_builder,
              "broken_forward": lambda: zoo_sweep.Spec(BrokenForward(), inputs=[torch.randn(1, 3, 8, 8)])}
    rows = zoo_sweep.sweep(models, keep=0.5, method="even", source="test", budget_s=60, show_progress=False)
    by = {r["model"]: r for r in rows}
    assert list(by) == list(models)

    ok = by["small_conv"]
    assert ok["error"] is None and ok["exact"] is True, ok
    assert ok["max_rel_diff"] <= zoo_sweep.EXACT_REL
    assert ok["params_merged"] < ok["params"]
    assert ok["groups"] >= 1 and ok["skipped"] >= 1  # the classifier's group is skipped, with its reason
    assert "output" in ok["main_skip_reason"]
    assert ok["params_tp"] is not None and ok["params_tp"] < ok["params"], ok["tp_error"]
    assert ok["ratio"] == pytest.approx(ok["params_merged"] / ok["params_tp"])

    for name, words in (("broken_build", "ValueError: no such model"),
                        ("broken_forward", "RuntimeError: this forward always fails")):
        r = by[name]
        assert r["error"] and words in r["error"] and "\n" not in r["error"] and "second line" not in r["error"]
        assert r["exact"] is None and r["params_merged"] is None

    md = zoo_sweep.to_markdown(rows, dict(command="python benchmarks/zoo_sweep.py --only x", keep=0.5,
                                          method="even", versions={"torch": torch.__version__}))
    table = md[md.index("| model |"):]
    for name in models:
        assert f"| {name} | test |" in table
    assert "python benchmarks/zoo_sweep.py --only x" in md and "keep: 0.5" in md
    assert len(table.splitlines()) == 2 + len(models)  # header, separator, one line per model
    s = zoo_sweep.summarize(rows)["test"]
    assert s["models"] == 3 and s["exact"] == 1 and set(s["failed"]) == {"broken_build", "broken_forward"}


def test_skip_reasons_condensed_and_helpers():
    skipped = [(("a.b",), "'a.b' is a LayerNorm (x); unknown op 'Permute': no rule"),
               (("c",), "'c' is a LayerNorm (x)"),
               (("d", "e"), "channels come from different layers (['d', 'e'], e.g. a concat)")]
    assert zoo_sweep.condense_skips(skipped) == [["M is a LayerNorm (x)", 2], ["unknown op 'Permute': no rule", 1],
                                                 ["channels come from different layers ([..], e.g. a concat)", 1]]
    assert zoo_sweep.condense_skips([(("a",), "'a' is a grouped Conv2d (groups=32)"),
                                     (("b",), "'b' is a grouped Conv2d (groups=4)")]) == [
        ["M is a grouped Conv2d (groups=N)", 2]]
    assert zoo_sweep.one_line(ValueError("x" * 500)).endswith("...")
    assert len(zoo_sweep.one_line(ValueError("x" * 500))) == 160
    assert zoo_sweep.default_classifier(SmallNet()) == ["fc"]
    squeeze_like = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 10, 1))
    assert zoo_sweep.default_classifier(squeeze_like) == ["2"]
    with pytest.raises(zoo_sweep.StageTimeout):
        with zoo_sweep.time_limit(0.05):
            while True:
                pass


def test_one_line_keeps_the_cause_of_a_long_wrapper():
    try:
        try:
            1 // 0
        except ZeroDivisionError as e:
            raise ValueError("cannot trace Net with the example inputs: forward or the autograd graph walk "
                             "failed with ZeroDivisionError: integer division or modulo by zero") from e
    except ValueError as e:
        text = zoo_sweep.one_line(e)
    assert text.startswith("ValueError: cannot trace") and "<- ZeroDivisionError: integer division" in text
    assert len(text) <= 160


class DiesOnSecondForward(nn.Module):
    """Ends its process on its second forward (the first picks the input; torch-pruning's trace is the second):
    a stand-in for a segfault in native code."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 2:
            os._exit(7)
        return self.fc(self.conv(x).mean((2, 3)))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="isolation forks")
def test_isolated_sweep_survives_a_dying_model():
    models = {"small_conv": _small,
              "dies": lambda: zoo_sweep.Spec(DiesOnSecondForward(), inputs=[torch.randn(1, 3, 8, 8)])}
    rows = zoo_sweep.sweep(models, keep=0.5, source="test", budget_s=60, show_progress=False, isolate=True)
    ok, dead = rows
    assert ok["model"] == "small_conv" and ok["exact"] is True and ok["params_merged"] < ok["params"]
    assert dead["model"] == "dies" and dead["params"] is not None  # what the stages before the crash found
    assert "exited with code 7" in dead["tp_error"] and dead["error"]
