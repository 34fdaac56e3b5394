"""Where SE can go in a traced graph: which adds are residual, and where each position puts the module.

* ``graph_index.py``: a graph's structure (node order, ancestor bitsets, which nodes carry data).
* ``classify.py``: :func:`classify_adds`, the site finder: a pure function over a graph with shapes.
* ``shortcut.py``: what a shortcut may hold, and where SE meets the add.
* ``channel_axis.py``: which dim holds a tensor's channels, proven from the ops that made it.
* ``existing.py``: whether a branch already has channel attention.
* ``placement.py``: ``position=``: where each position puts the module in a block's graph.
* ``aliasing.py``: whether a module placed before some readers still reads what they read
  (in-place ops).
"""
