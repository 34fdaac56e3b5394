"""From a model to traced scopes with shapes: everything se_inject does with torch.fx and a real forward.

* ``tracer.py``: :class:`SETracer` and :func:`trace` (leaves, modules left as they were),
  ``TRACE_LOCK``, hook stashing and global hooks.
* ``record.py``: the one forward recorder (what modules receive and return in a real forward,
  with options for what it keeps), and comparing two outputs.
* ``specialize.py``: tracing a module with the non-tensor options of its real call baked in.
* ``search.py``: every traceable module that can hold a residual add, however deep, and the
  retry until every scope's graph runs (:func:`runnable_scopes`).
* ``scopes.py``: :class:`Scope` (a module traced as its own root) and each node's shape.
* ``leaf_axis.py``: the channel dim of a leaf fx cannot see into, proven from the forward.
* ``train_mode.py``: whether a block traces differently in train mode.
* ``hf.py``: what differs for Hugging Face models (their capture hooks, their input size).
* ``ops.py``: what se_inject knows about modules and functions (convs, norms, activations,
  attention, in-place ops): the tracer's leaves and the site finder's predicates.
"""
