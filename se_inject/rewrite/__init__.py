"""From sites to a model with SE: cut each block out of its scope's graph, verify it, build its
modules, swap it in.

* ``cut.py``: each residual add's block as a GraphModule of its own, a stand-in where SE goes.
* ``rewritten.py``: :class:`RewrittenBlock`, the GraphModule that keeps all of the block it
  replaces (through deep copies and pickling too).
* ``insert_pass.py``: the graph pass that puts a module between a branch and what reads it.
* ``signature.py``: a rewritten block takes its module's call signature, checking frozen values.
* ``verify.py``: rewritten blocks must reproduce their modules on what they really received.
* ``site_modules.py``: every site's module built and run once before anything changes.
* ``pipeline.py``: :func:`analyse` (sites to verified blocks) and :func:`install` (the swap).
"""
