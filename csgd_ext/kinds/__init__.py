"""Stage 2, layer kinds: what each kind of layer means to a plan and a merge, each said once.

* :mod:`.layer_kinds` -- one ``Kind`` record per layer kind (conv, linear, norms, embeddings, ...);
* :mod:`.norms` -- the multiplicity-weighted norms a merge puts in place of a norm over merged channels;
* :mod:`.norm_probing` -- a norm's form (channel dim, affine, act), found by running it once;
* :mod:`.attention` -- attention rules per class (:func:`register_attention`) and head bookkeeping;
* :mod:`.width_attrs` -- width attributes a module keeps beside its layers (:func:`register_width_attribute`);
* :mod:`.weight_baking` -- conv/linear subclasses that transform their own weight, baked into plain layers;
* :mod:`.model_call` -- how the library calls a model on example inputs.

Imports nothing of the other stages.
"""
