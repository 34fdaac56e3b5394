"""From a model to traced scopes with shapes: everything se_inject does with torch.fx and a real forward.

* ``tracer.py``: :class:`SETracer` and :func:`trace` (leaves, modules left as they were),
  ``TRACE_LOCK``, hook stashing and global hooks.
* ``record.py``: what modules receive and return in a real forward; comparing two outputs.
* ``specialize.py``: tracing a module with the non-tensor options of its real call baked in.
* ``search.py``: every traceable module that can hold a residual add, however deep.
* ``scopes.py``: the scopes the search found, each node's shape, the retry when a graph fails.
* ``leaf_axis.py``: the channel dim of a leaf fx cannot see into, proven from the forward.
* ``train_mode.py``: whether a block traces differently in train mode.
* ``hf.py``: what differs for Hugging Face models (their capture hooks, their input size).
* ``ops.py``: what se_inject knows about modules and functions (convs, norms, activations,
  attention, in-place ops): the tracer's leaves and the site finder's predicates.
"""
