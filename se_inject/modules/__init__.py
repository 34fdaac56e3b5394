"""What se_inject inserts: the modules that go at a site, and how they are built from the options.

* ``se_block.py``: :class:`SEBlock`, :class:`SEResidual` (SE that also does the residual add and
  the activation after it), :func:`set_kernels`, the hidden-width rule.
* ``attentions.py``: the attentions ``attn=`` takes by name (:data:`ATTENTIONS`), timm's builders,
  :class:`GainGate` and the identity init of timm attentions.
"""
