"""DistributedDataParallel with CSGD: 2 gloo processes on CPU stay identical and match single-process
training on the global batch; sharded parameters (FSDP2 / DTensor) are refused with a clear error."""

import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import csgd_ext

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD, STEPS, LOCAL_BATCH = 2, 4, 4


class Net(nn.Module):  # no BatchNorm: DDP keeps per-rank BN statistics, which single-process training would not
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean((2, 3)))


def build():
    torch.manual_seed(0)
    return Net()


def make_opt(params, model):
    ids1 = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    return csgd_ext.CSGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4, centripetal=0.05,
                         clusters={model.conv1.weight: ids1, model.conv1.bias: ids1,
                                   model.conv2.weight: torch.tensor([4, 4, 4, 9, 9, 1])})


def global_batches():
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(WORLD * LOCAL_BATCH, 1, 6, 6, generator=g),
             torch.randint(0, 3, (WORLD * LOCAL_BATCH,), generator=g)) for _ in range(STEPS)]


_WORKER = textwrap.dedent("""
    import os, sys, datetime, traceback
    sys.path.insert(0, {repo!r})
    import torch, torch.distributed as dist
    import torch.nn.functional as F
    torch.set_num_threads(1)
    import csgd_ext
    from tests.test_ddp import build, make_opt, global_batches, LOCAL_BATCH
    rank, world, out = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), sys.argv[1]
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    model = build()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = make_opt(ddp.parameters(), model)
    for x, y in global_batches():
        sl = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)   # this rank's share of the global batch
        opt.zero_grad()
        F.cross_entropy(ddp(x[sl]), y[sl]).backward()             # DDP averages the gradients
        opt.step()
    result = {{"params": {{k: v.detach().clone() for k, v in model.state_dict().items()}},
               "bufs": [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]}}
    if rank == 0:
        csgd_ext.save_checkpoint(out + ".ck.pt", model=ddp, optimizer=opt, step=4)
    # sharded parameters: a clear error instead of wrong cluster means
    errors = {{}}
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (world,))
    w = torch.nn.Parameter(distribute_tensor(torch.randn(8, 4), mesh, [Shard(0)]))
    try:
        csgd_ext.CSGD([w], lr=0.1, clusters={{w: torch.arange(8) // 2}})
    except Exception as e:
        errors["dtensor"] = f"{{type(e).__name__}}: {{e}}"
    try:
        from torch.distributed.fsdp import fully_shard
        m2 = build()
        fully_shard(m2, mesh=mesh)
        csgd_ext.CSGD(m2.named_parameters(), lr=0.1, clusters={{"conv1.weight": torch.arange(8) // 2}})
    except Exception as e:
        errors["fully_shard"] = f"{{type(e).__name__}}: {{e}}"
    try:
        from torch.distributed.optim import ZeroRedundancyOptimizer
        m3 = build()
        ZeroRedundancyOptimizer(m3.parameters(), optimizer_class=csgd_ext.CSGD, lr=0.1,
                                clusters={{m3.conv1.weight: torch.arange(8) // 2, m3.fc.weight: torch.arange(3)}})
    except Exception as e:
        errors["zero"] = f"{{type(e).__name__}}: {{e}}"
    result["errors"] = errors
    torch.save(result, f"{{out}}.rank{{rank}}.pt")
    dist.barrier()
    dist.destroy_process_group()
    # no interpreter teardown: DDP keeps the gloo group alive, and a gloo worker freeing a tensor Python made
    # during teardown aborts the process (csgd_ext/apps/fit.py, _end_follower_rank)
    sys.stdout.flush()
    os._exit(0)
""")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    script = tmp / "worker.py"
    script.write_text(_WORKER.format(repo=REPO))
    port = _free_port()
    procs = []
    for rank in range(WORLD):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(script), str(tmp / "out")], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, p in enumerate(procs):
        assert p.returncode == 0, f"rank {rank} failed:\n{logs[rank][-3000:]}"
    return tmp, [torch.load(tmp / f"out.rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_ranks_stay_identical(ddp_run):
    _, (r0, r1) = ddp_run
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), k
    for a, b in zip(r0["bufs"], r1["bufs"]):
        assert torch.equal(a, b)


def test_ddp_equals_single_process_on_the_global_batch(ddp_run):
    _, (r0, _) = ddp_run
    model = build()
    opt = make_opt(model.parameters(), model)
    for x, y in global_batches():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    moved = 0.0
    init = build().state_dict()
    for k, v in model.state_dict().items():
        # the all-reduce averages two half-batch gradients: same maths, different summation order
        torch.testing.assert_close(r0["params"][k], v, rtol=1e-5, atol=1e-6, msg=k)
        moved = max(moved, (v - init[k]).abs().max().item())
    assert moved > 1e-3  # training did move the weights, so the comparison means something
    for a, p in zip(r0["bufs"], model.parameters()):
        torch.testing.assert_close(a, opt.state[p]["momentum_buffer"], rtol=1e-5, atol=1e-6)
    ids = opt.clusters[model.conv1.weight]
    w = model.conv1.weight.detach()
    # clustered rows moved towards each other in the DDP run too
    d0 = (init["conv1.weight"][0] - init["conv1.weight"][1]).abs().max()
    assert (r0["params"]["conv1.weight"][0] - r0["params"]["conv1.weight"][1]).abs().max() < d0
    assert ids.tolist() == [0, 0, 1, 1, 2, 2, 3, 3] and w.shape[0] == 8


def test_ddp_checkpoint_has_plain_keys_and_resumes(ddp_run):
    tmp, (r0, _) = ddp_run
    model = build()
    opt = make_opt(model.parameters(), model)
    ck = csgd_ext.load_checkpoint(tmp / "out.ck.pt", model=model, optimizer=opt)
    assert ck.step == 4
    for k, v in model.state_dict().items():
        assert torch.equal(v, r0["params"][k]), k


def test_sharded_parameters_are_refused_clearly(ddp_run):
    _, (r0, r1) = ddp_run
    for r in (r0, r1):
        assert r["errors"]["dtensor"].startswith("ValueError") and "DTensor" in r["errors"]["dtensor"]
        msg = r["errors"]["fully_shard"]
        assert msg.startswith("ValueError") and "'conv1.weight'" in msg and "DistributedDataParallel" in msg
    # ZeRO: each rank's CSGD holds a partition only; a rank given clusters for another rank's parameters refuses
    zero = [r["errors"]["zero"] for r in (r0, r1) if "zero" in r["errors"]]
    assert zero and all(e.startswith("ValueError") and "not one of the optimizer's parameters" in e for e in zero)
