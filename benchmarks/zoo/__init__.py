"""Sweeps over model zoos: ``sweep.py`` (our plan + merge beside torch-pruning on torchvision / timm models,
writes ``ZOO.md``; helpers ``builders``, ``compare``, ``isolated``, ``reasons``, ``tp``, ``report``),
``plan_time.py`` (planning time of one zoo model) and ``plan_report.py`` (params / MACs / logit difference of
plan + merge on ResNet-56 and ResNet-50).
"""
