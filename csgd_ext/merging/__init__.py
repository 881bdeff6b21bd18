"""Stage 4, merging: turn a trained model whose clusters are identical into a physically smaller one that
computes the same function (:func:`~csgd_ext.merging.merge.merge`), and report what changed
(:func:`~csgd_ext.merging.merge.merge_report`).

Imports :mod:`csgd_ext.plan`, :mod:`csgd_ext.kinds`, :mod:`csgd_ext.measure` and :mod:`csgd_ext.optim`'s row layouts.
"""
