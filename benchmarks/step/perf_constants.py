"""The performance models' shared assumptions (``perf_model.py`` for the CUDA kernel, ``perf_model_triton.py``
for the Triton backend): a GPU's latencies and launch costs. Assumptions, not measurements; the first lent GPU
checks them (``gpu_bench.py`` prints the model beside each figure)."""

LATENCY_US = 0.7      # a loaded global-memory round trip
LAUNCH_US = 2.5       # the first launch of a step: launch latency, ramp-up, tail
LAUNCH_GAP_US = 1.0   # each further back-to-back launch in the same stream: drain and ramp-up
SECTOR = 32           # bytes of one DRAM sector
H200 = dict(bandwidth_gbs=4300.0, sms=132)
