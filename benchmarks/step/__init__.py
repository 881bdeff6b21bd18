"""The optimizer step, timed and modelled: ``run.py`` (the CPU report, ``RESULTS.md``), ``step_ab.py`` (two
builds side by side), ``access_order.py`` (row-order probe of the native op), ``equivalence_table.py``,
``host_overhead.py``, the GPU performance model (``perf_model.py``, ``perf_model_triton.py``,
``perf_constants.py``) and the one-shot GPU check (``gpu_check.sh`` with ``gpu_report.py``, ``gpu_bench.py``,
``gpu_bench_report.py``, ``gpu_step.py``, ``gpu_small_step.py``). See ``benchmarks/README.md``.
"""
