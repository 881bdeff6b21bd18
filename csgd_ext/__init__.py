"""csgd_ext: Centripetal SGD (C-SGD) channel pruning for PyTorch.

    import csgd_ext
    opt = csgd_ext.CSGD(model.parameters(), lr=0.1, momentum=0.9, centripetal=3e-3, clusters={...})
    csgd_ext.available_backends()   # {"reference": None, "native": None or why not, "triton": ...}

``python -m csgd_ext info`` reports what was built and which backends can run.
"""

__version__ = "0.1.0"

from .layout import ClusterLayout  # noqa: E402
from .ops import BackendUnavailableError, available_backends  # noqa: E402
from .optim import CSGD  # noqa: E402
from .checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from .merge import collapse, deviation, merge  # noqa: E402
from .plan import ClusterPlan, plan_clusters  # noqa: E402
from .reorder import contiguous_clusters  # noqa: E402
from . import flops, latency, models  # noqa: E402  (model zoo, MACs/params counter, CPU latency)
from .train import DeviationLogger, evaluate, fit  # noqa: E402  (training helper)

__all__ = ["CSGD", "fit", "evaluate", "DeviationLogger", "plan_clusters", "ClusterPlan", "contiguous_clusters", "deviation", "collapse", "merge", "save_checkpoint", "load_checkpoint", "available_backends", "BackendUnavailableError", "ClusterLayout", "__version__"]
