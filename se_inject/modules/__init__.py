"""What se_inject inserts: the modules that go at a site, and how they are built from the options.

* ``se_block.py``: :class:`SEBlock`, :class:`SEResidual` (SE that also does the residual add and
  the activation after it), :func:`set_kernels`, the hidden-width rule, exact identity init.
* ``attentions.py``: the attentions ``attn=`` takes by name (:data:`ATTENTIONS`), timm's builders,
  :class:`GainGate`, the identity init of timm attentions, the mark on inserted modules.
* ``build.py``: the one builder from the options to a site's module, the check every module passes
  at its site, and the one check of the options against the attention, run before any analysis.
"""
