"""Without the native extension the package imports, runs on the reference backend, and says why native is missing."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import csgd_ext

SCRIPT = r"""
import sys
# an editable install maps csgd_ext.* to the checkout (where _C is built): drop that finder
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")
                    and "editable" not in getattr(type(f), "__module__", "")]
import torch, csgd_ext
assert csgd_ext.__file__.startswith(sys.argv[1]), csgd_ext.__file__
why = csgd_ext.available_backends()["native"]
assert why is not None and "not built" in why, why
w = torch.nn.Parameter(torch.ones(4, 2))
opt = csgd_ext.CSGD([w], lr=0.5, centripetal=1.0, clusters={w: torch.tensor([0, 0, 1, 1])})
w.grad = torch.ones_like(w)
opt.step()
assert torch.allclose(w, torch.full((4, 2), 0.5))
try:
    csgd_ext.CSGD([w], lr=0.1, backend="native")
except csgd_ext.BackendUnavailableError as e:
    print("ERR", e)
"""


def test_pure_python_install_runs_on_reference(tmp_path):
    src = Path(csgd_ext.__file__).parent
    dst = tmp_path / "csgd_ext"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "ERR backend 'native' is unavailable on cpu: the native extension csgd_ext._C was not built" in out.stdout
