"""A merged model that deploys without csgd_ext: ``merged.pt2`` (``torch.export``) and ``merged.onnx`` written by
:func:`csgd_ext.apps.export.export_merged`, loaded in a process that never imports csgd_ext (torch.export.load,
onnxruntime) and compared with the merged module's outputs (1e-5 relative), on zoo CNNs, a ConvNeXt-like net and
a ViT whose merges put in weighted norms and fewer heads."""

import json
import subprocess
import sys

import pytest
import torch

import csgd_ext
from csgd_ext.apps.export import export_merged, onnx_unavailable_reason
from csgd_ext.models import get_model

from attention_nets import vit
from modern_nets import ConvNeXtNet

ONNX = onnx_unavailable_reason() is None and __import__("importlib").util.find_spec("onnxruntime") is not None

LOADER = r'''
import json, sys
import numpy as np
import torch
cases = json.loads(sys.argv[1])
worst = {}
for c in cases:
    x = torch.load(c["x"])
    want = torch.load(c["want"])
    got = torch.export.load(c["stem"] + ".pt2").module()(x)
    worst[c["name"] + " pt2"] = float(((got - want).abs().max() / want.abs().max()).item())
    if c["onnx"]:
        import onnxruntime as ort
        sess = ort.InferenceSession(c["stem"] + ".onnx", providers=["CPUExecutionProvider"])
        got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
        worst[c["name"] + " onnx"] = float(((got - want).abs().max() / want.abs().max()).item())
assert not any(m == "csgd_ext" or m.startswith("csgd_ext.") for m in sys.modules), "csgd_ext was imported"
print(json.dumps(worst))
'''


def merged(model, x, keep=0.5):
    torch.manual_seed(0)
    model = model.eval()
    plan = csgd_ext.plan_clusters(model, x[:1], keep=keep, method="even")
    assert plan.groups
    csgd_ext.collapse(model, plan)
    return csgd_ext.merge(model, plan).eval()


def nets():
    torch.manual_seed(0)
    yield "resnet20", get_model("resnet20", width=0.5, num_classes=10), torch.randn(3, 3, 32, 32)
    yield "mobilenetv2", get_model("mobilenetv2", width=0.25, num_classes=10), torch.randn(3, 3, 32, 32)
    yield "convnext", ConvNeXtNet(), torch.randn(3, 3, 32, 32)
    yield "vit", vit("timm"), torch.randn(3, 1, 28, 28)


@pytest.mark.skipif(not ONNX, reason="the [export] extra (onnx, onnxscript, onnxruntime) is not installed")
def test_exported_files_run_without_csgd_ext_and_match_the_merged_model(tmp_path):
    cases = []
    for name, model, x in nets():
        small = merged(model, x)
        stem = str(tmp_path / name)
        res = export_merged(small, x[:1], stem)
        assert "error" not in res["pt2"] and "error" not in res["onnx"], res
        assert res["pt2"]["dynamic_batch"] and res["onnx"]["dynamic_batch"], res  # exported at batch 1, run at 3
        with torch.no_grad():
            want = small(x)
        torch.save(x, stem + ".x.pt")
        torch.save(want, stem + ".want.pt")
        cases.append({"name": name, "stem": stem, "x": stem + ".x.pt", "want": stem + ".want.pt", "onnx": True})
    done = subprocess.run([sys.executable, "-c", LOADER, json.dumps(cases)], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    worst = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(worst) == 2 * len(cases)
    assert all(v <= 1e-5 for v in worst.values()), worst


def test_without_onnx_the_pt2_is_still_written(tmp_path, monkeypatch):
    from csgd_ext.apps import export

    monkeypatch.setattr(export.importlib.util, "find_spec", lambda name: None if name == "onnxscript" else 1)
    small = merged(get_model("resnet20", width=0.25, num_classes=10), torch.randn(2, 3, 16, 16))
    res = export_merged(small, torch.randn(1, 3, 16, 16), str(tmp_path / "m"))
    assert res["pt2"]["path"].endswith("m.pt2") and (tmp_path / "m.pt2").exists()
    assert res["onnx"] == {"error": 'onnxscript not installed (pip install -e ".[export]")'}
    assert not (tmp_path / "m.onnx").exists()
