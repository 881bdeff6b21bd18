"""benchmarks/zoo/sweep.py on tiny in-repo nets (no torchvision/timm needed): a merge is exact and smaller,
torch-pruning's count is beside it (a ViT-like net with its head options), the round_to and target_flops plans
and the planning time are in each row (a planner's ValueError as its one-line reason), and a model that fails
to build or to run gets a one-line reason in its row instead of stopping the sweep; the markdown names every
model."""

import os
import sys

import pytest
import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.zoo import sweep as zoo_sweep  # noqa: E402

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
              "broken_forward": lambda: zoo_sweep.Spec(BrokenForward(), inputs=[torch.randn(1, 3, 8, 8)]),
              "nothing_to_plan": lambda: zoo_sweep.Spec(nn.Sequential(nn.Flatten(), nn.Linear(192, 10)),
                                                        inputs=[torch.randn(1, 3, 8, 8)])}
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
    assert ok["plan_s"] > 0 and ok["seconds"]["plan"] == ok["plan_s"]
    rt, tf = ok["round_to"], ok["target_flops"]
    assert rt["round_to"] == 8 and rt["keep"] == 0.5 and rt["exact"] is True and rt["error"] is None
    assert ok["params_merged"] <= rt["params"] < ok["params"]  # widths rounded up to multiples of 8 (or kept)
    assert tf["target_flops"] == 0.5 and tf["exact"] is True and 0.45 <= tf["flops_frac"] <= 0.5 + 1e-9

    for name, words in (("broken_build", "ValueError: no such model"),
                        ("broken_forward", "RuntimeError: this forward always fails")):
        r = by[name]
        assert r["error"] and words in r["error"] and "\n" not in r["error"] and "second line" not in r["error"]
        assert r["exact"] is None and r["params_merged"] is None

    md = zoo_sweep.to_markdown(rows, dict(command="python benchmarks/zoo/sweep.py --only x", keep=0.5,
                                          method="even", versions={"torch": torch.__version__}))
    table = md[md.index("| model |"):]
    for name in models:
        assert f"| {name} | test |" in table
    assert "python benchmarks/zoo/sweep.py --only x" in md and "keep: 0.5" in md
    assert len(table.splitlines()) == 2 + len(models)  # header, separator, one line per model
    assert "| round_to: params after (exact?) | target_flops: FLOPs reached (exact?) |" in table
    assert f"| {ok['plan_s']:.2f} | {ok['round_to']['params'] / 1e6:.2f}M, yes | " in table
    # a plan that clusters nothing "merges" exactly, trivially: it is counted apart, not as exact
    nothing = by["nothing_to_plan"]
    assert nothing["groups"] == 0 and nothing["exact"] is True and nothing["params_merged"] == nothing["params"]
    assert "| nothing_to_plan | test | n/a (nothing planned) |" in table
    s = zoo_sweep.summarize(rows)["test"]
    assert s["models"] == 4 and set(s["failed"]) == {"broken_build", "broken_forward"}
    assert s["exact"] == 1 and s["compared"] == 1 and s["nothing_planned"] == ["nothing_to_plan"]
    assert "merged exactly: 1 of 1 compared (nothing planned: 1, not counted)" in md
    assert s["round_to_exact"] == [1, 1] and s["target_flops_exact"] == [1, 1]


class Attention(nn.Module):
    """timm's attention block in small: fused qkv, forward reading num_heads, head_dim and attn_dim."""

    def __init__(self, dim=16, heads=4):
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.attn_dim = heads * self.head_dim
        self.qkv = nn.Linear(dim, 3 * self.attn_dim)
        self.proj = nn.Linear(self.attn_dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, self.attn_dim))


class TinyViT(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 4, 4)
        self.norm = nn.LayerNorm(16)
        self.attn = Attention()
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = t + self.attn(self.norm(t))
        return self.head(t.mean(1))


def test_vit_gets_torch_prunings_head_options_and_an_unreachable_target_is_a_reason():
    pytest.importorskip("torch_pruning")
    from benchmarks.zoo import tp as zoo_tp
    from benchmarks.zoo.builders import count_params

    torch.manual_seed(0)
    model, x = TinyViT().eval(), torch.randn(1, 3, 16, 16)
    assert zoo_tp.attention_heads(model) == {model.attn.qkv: 4} and zoo_tp.is_transformer(model)
    n, note = zoo_tp.tp_row(model, x, 0.5, ["head"])  # heads pruned, attributes fixed: its forward runs
    assert note == "" and n < count_params(model)
    assert model.attn.num_heads == 4 and model.attn.qkv.out_features == 48  # on a copy
    row = zoo_sweep.run_one("vit", TinyViT, 0.5, "even", budget_s=60, target_flops=0.01)
    assert row["error"] is None and row["exact"] is True and row["tp_error"] is None
    reason = row["target_flops"]["error"]
    assert reason.startswith("ValueError: target_flops=0.01") and "\n" not in reason
    assert row["target_flops"]["exact"] is None and row["round_to"]["exact"] is True
    assert zoo_sweep.run_one("vit", TinyViT, 0.5, "even", budget_s=60, round_to=0, target_flops=None,
                             run_tp=False).keys().isdisjoint({"round_to", "target_flops"})


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


class TokenClassifier(nn.Module):
    """BERT-like, as ``--source hf`` sweeps it (no transformers needed): token ids -> ``nn.Embedding`` stream ->
    blocks with Hugging Face-style self-attention (``query``/``key``/``value``, ``num_attention_heads``, the
    output ``dense`` in a sibling) -> the first token -> ``classifier``."""

    def __init__(self, vocab=64, dim=32, heads=4):
        from attention_nets import Block
        from user_attention_nets import HFAttention

        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.Sequential(Block(dim, heads, HFAttention), Block(dim, heads, HFAttention))
        self.norm, self.classifier = nn.LayerNorm(dim), nn.Linear(dim, 5)

    def forward(self, ids):
        return self.classifier(self.norm(self.blocks(self.embed(ids)))[:, 0])


def test_token_ids_and_torch_prunings_hugging_face_head_options():
    pytest.importorskip("torch_pruning")
    from benchmarks.zoo import tp as zoo_tp
    from benchmarks.zoo.builders import HFClassifier, tokens

    ids = tokens(64)
    assert ids.dtype == torch.long and ids.shape == (1, 16) and int(ids.max()) == 63
    torch.manual_seed(0)
    model = TokenClassifier().eval()
    found = zoo_tp.hf_attention(model)
    assert [h for _, h in found.values()] == ["num_attention_heads"] * 2
    for which in ("hf_bert", "hf_vit"):
        row = zoo_sweep.run_one(which, lambda: zoo_sweep.Spec(TokenClassifier(), inputs=[ids],
                                                              extra=dict(tp_heads=which)),
                                0.5, "even", budget_s=60, round_to=None, target_flops=None)
        assert row["error"] is None and row["exact"] is True and row["input"] == "16", row
        assert row["params_merged"] < row["params"] and row["tp_error"] is None, row["tp_error"]
        assert row["params_tp"] < row["params"]

    class Backbone(nn.Module):  # a headless model whose output has a pooler_output, as CLIPVisionModel's
        def forward(self, x):
            return type("Out", (), {"pooler_output": x.mean(1)})()

    assert HFClassifier(Backbone(), 8, 3)(torch.randn(2, 4, 8)).shape == (2, 3)


def test_a_report_goes_into_its_own_section_and_replaces_it_on_a_rerun():
    from benchmarks.zoo.report import put_section

    doc = "# Zoo\n\n## Summary\n\nold rows\n"
    md = "# Model-zoo sweep\n\n```bash\npython sweep.py\n```\n\n## Summary\n\none\n\n## Models\n\n| a |\n"
    once = put_section(doc, md, "Hugging Face", "From configs.")
    assert once.startswith(doc) and "## Hugging Face\n\nFrom configs.\n\n```bash" in once
    assert "### Summary\n\none" in once and "### Models" in once and "# Model-zoo" not in once
    twice = put_section(once + "\n## After\n\nkept\n", md.replace("one", "two"), "Hugging Face")
    assert twice.count("## Hugging Face") == 1 and "one" not in twice and "### Summary\n\ntwo" in twice
    assert twice.startswith(doc) and twice.endswith("## After\n\nkept\n")
