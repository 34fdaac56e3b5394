"""Files in and out: a converted model saved and loaded again, where a model comes from, checkpoints.

* ``recipe.py``: :func:`save` / :func:`load`: safetensors weights plus a JSON recipe.
* ``atomic_dir.py``: replacing a directory as a whole (write beside it, then swap it in).
* ``rebuild_check.py``: whether a model rebuilt from a recipe computes what the saved one does.
* ``sources.py``: where a model comes from (a timm name, a transformers class and config, a local
  directory), building it offline, and the model names a command or a benchmark is given.
* ``checkpoint.py``: reading a source model's weights from a file without unpickling code.
"""
