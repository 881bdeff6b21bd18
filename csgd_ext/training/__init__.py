"""Stage 5, training: a plain training loop (:mod:`.loop`), watching the clusters converge
(:mod:`.monitor`: ``deviation``, ``collapse``), and atomic, verified checkpoints (:mod:`.checkpoint`).

Imports :mod:`csgd_ext.merging` (loading a merged checkpoint), :mod:`csgd_ext.plan.records` and below; never planning.
"""
