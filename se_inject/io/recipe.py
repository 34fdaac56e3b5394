"""Save a converted model as safetensors weights plus a JSON recipe, and load it back.

Nothing is pickled: the structure is rebuilt from the recipe (the timm model name and kwargs, or the
transformers class and config, see :mod:`se_inject.io.sources`; then :func:`se_inject.inject` with the
recorded options), the weights are read with safetensors, and both are checked: the sites must be
the recorded ones, every tensor must be there with its shape and dtype, and the weights file must
have the recorded SHA-256.

A saved directory holds ``recipe.json`` and ``model.safetensors``::

    {"format": "se_inject.recipe", "format_version": 1,
     "source": {"library": "timm", "model": "resnet50", "kwargs": {}},
     (or "source": {"library": "transformers", "model": "ResNetForImageClassification", "config": {...}}),
     "options": {"reduction": 16, "rd_divisor": 8, ...}, "example_input_shape": [1, 3, 224, 224],
     "dtype": "float32", "sites": ["layer1.0.se", ...],
     "weights": {"file": "model.safetensors", "sha256": "..."},
     "versions": {"se_inject": "...", "torch": "...", "timm": "...", "torchvision": "..."}}

:func:`save` rebuilds the model from what the recipe will say before it writes anything, loads
the model's weights into it and runs both on the example input, so wrong model name or kwargs
never produce a directory that cannot be loaded or that loads as another computation. It writes a
complete save into a new sibling directory and then swaps that in for the old one (see
:mod:`se_inject.io.atomic_dir`), so a failure at any point leaves a previous save whole.

:func:`load` reads nothing but ``recipe.json`` and the weights file beside it and runs no code from
them: every field of the recipe is checked for its type, the source for code, files and downloads
(:func:`se_inject.io.sources.refusal`), the model's size on the meta device before it is allocated
(:data:`MAX_PARAMETERS`), and every tensor for its name, shape and dtype.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import safetensors
import safetensors.torch
import timm
import torch
import torchvision
from torch import nn

from ..api import checked_options, default_example_inputs, inject
from ..errors import OptionError, RecipeError, UnknownModelError
from ..options import SEOptions
from ..plan import Injection
from ..utils import describe_mismatch, first_line, version
from .atomic_dir import write_directory
from .rebuild_check import check_one_dtype, floating_dtype, likely_cause, output_difference
from .sources import Source, source_for

__all__ = ["save", "load", "read_recipe", "RECIPE_FILE", "WEIGHTS_FILE", "FORMAT", "FORMAT_VERSION",
           "MAX_INPUT_ELEMENTS", "MAX_PARAMETERS"]

RECIPE_FILE = "recipe.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "se_inject.recipe"
FORMAT_VERSION = 1
#: The largest example input a recipe may ask :func:`load` to allocate (elements).
MAX_INPUT_ELEMENTS = 1 << 26
#: The largest model :func:`load` builds unless its ``max_parameters`` says otherwise, in parameter
#: and buffer elements counted on the meta device before anything is allocated: 8 GB in float32,
#: more than any timm or transformers vision model but the few giant ones.
MAX_PARAMETERS = 2_000_000_000
#: The fields se_inject writes in a recipe; ``example_input_shape``, ``dtype`` and ``versions``
#: may be absent (recipes written before they were recorded).
FIELDS = ("format", "format_version", "source", "options", "example_input_shape", "dtype", "sites", "weights",
          "versions")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _dtype_of(model: nn.Module) -> str:
    return str(floating_dtype(model)).removeprefix("torch.")


def _recipe(result: Injection, origin: Source) -> dict[str, Any]:
    try:
        options = result.plan.options.to_dict()
    except OptionError as e:
        raise RecipeError(f"cannot record this model's options: {e}. Pass the option by name to save it.") from e
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "source": origin.to_dict(),
        "options": options,
        "example_input_shape": list(result.plan.input_shapes[0]) if result.plan.input_shapes else None,
        "dtype": _dtype_of(result.model),
        "sites": [s.name for s in result.plan.sites],
        "versions": {"se_inject": version(), "torch": torch.__version__, "timm": timm.__version__,
                     "torchvision": torchvision.__version__, **origin.versions()},
    }


def _given(source: Mapping[str, Any]) -> str:
    return (f"model_name={source['model']!r} with model_kwargs={source['kwargs']}" if source["library"] == "timm"
            else f"{source['model']} with its config")


def _check_rebuilds(result: Injection, recipe: dict[str, Any]) -> None:
    """Rebuild the model from ``recipe`` and compare it with ``result.model``: the same sites, the
    same tensor names, shapes and dtypes, and, with ``result.model``'s weights loaded, the same
    outputs on the example input. Raises RecipeError saying what differs."""
    given = _given(recipe["source"])
    rebuilt = _rebuild(recipe, f"the source given to save ({given})")
    mismatch = describe_mismatch(rebuilt.state_dict(), result.model.state_dict(), dtypes=True)
    if mismatch:
        raise RecipeError(f"{given} does not rebuild this model ({mismatch}); pass the name and kwargs it was "
                          f"created with")
    example = _example(recipe)
    difference = output_difference(rebuilt, result.model,
                                   (example,) if example is not None else default_example_inputs(rebuilt))
    if difference:
        kwargs = recipe["source"]["kwargs"] if recipe["source"]["library"] == "timm" else None
        raise RecipeError(f"{given} rebuilds a model with the same tensors that computes something else "
                          f"({difference} on the example input, with this model's weights)"
                          f"{likely_cause(rebuilt, result.model, kwargs)}; pass every kwarg the model was created with")


def _target(out: Path, overwrite: bool) -> Path:
    """Where :func:`save` writes: ``out`` (a symlink resolved), if it may be written or replaced."""
    if out.is_symlink():
        out = out.resolve()
    if out.exists() and not out.is_dir():
        raise RecipeError(f"{out} is a file; pass a directory to save into")
    if out.is_dir() and ((out / RECIPE_FILE).exists() or (out / WEIGHTS_FILE).exists()):
        if not overwrite:
            raise RecipeError(f"{out} already holds a saved model; pass overwrite=True (--overwrite) to replace it")
        foreign = sorted(p.name for p in out.iterdir() if p.name not in (RECIPE_FILE, WEIGHTS_FILE)
                         and not p.name.startswith(".se_inject-"))  # older se_inject's leftovers
        if foreign:
            raise RecipeError(f"{out} holds other files besides a saved model ({foreign[:5]}); overwrite replaces "
                              f"the directory as a whole, so move them out first or save into another directory")
    return out


def save(
    result: Injection,
    directory: Union[str, os.PathLike],
    *,
    model_name: Optional[str] = None,
    model_kwargs: Optional[Mapping[str, Any]] = None,
    source: Optional[Source] = None,
    overwrite: bool = False,
) -> Path:
    """Write ``result`` to ``directory`` as ``model.safetensors`` and ``recipe.json``.

    The model is first rebuilt from its source (``model_name`` and ``model_kwargs``, or a
    transformers model's class and config) with the recorded options, and must have the same
    sites and tensors (names, shapes, dtypes) as ``result.model``; given ``result.model``'s
    weights, it must also give the same outputs on the example input (one more forward of each),
    so a kwarg that changes the computation but no tensor (timm's ``act_layer``, ``global_pool``,
    ``output_stride``) cannot be left out (see :mod:`se_inject.io.rebuild_check`). Both files are then
    written into a new directory beside ``directory``, which takes its place in one step (see
    :mod:`se_inject.io.atomic_dir`): a failure at any point leaves a previous save whole and
    loadable. As the directory is replaced whole, ``overwrite`` refuses one holding other files.

    Args:
        result: what :func:`se_inject.inject` returned.
        directory: where to write (created if missing).
        model_name: for a timm model, the name it was built from (``"resnet50"``).
        model_kwargs: the keyword arguments it was built with (JSON-serialisable), e.g.
            ``{"num_classes": 10}``.
        source: where the model comes from, as a :class:`se_inject.io.sources.Source`, instead of
            ``model_name``. A transformers model needs neither: its class and config are recorded.
        overwrite: replace a model already saved in ``directory``.

    Returns:
        The path of the recipe.

    Raises:
        RecipeError: a model is saved there and ``overwrite`` is False (or the directory holds
            other files too), ``directory`` is a file, the kwargs are not JSON or name a file or a
            download, the model mixes floating dtypes, an option cannot be recorded, the name and
            kwargs do not rebuild the model (the message names the kwargs that are probably
            missing), or nothing says how to build it again.
        UnknownModelError: ``model_name`` is not a timm model (or the class not a transformers one).
    """
    origin = source_for(result.model, model_name, model_kwargs, source)
    out = _target(Path(directory), overwrite)
    check_one_dtype(result.model)
    recipe = _recipe(result, origin)
    _check_rebuilds(result, recipe)

    def write(directory: Path) -> None:
        safetensors.torch.save_model(result.model, str(directory / WEIGHTS_FILE))
        weights = {"file": WEIGHTS_FILE, "sha256": _sha256(directory / WEIGHTS_FILE)}
        (directory / RECIPE_FILE).write_text(json.dumps({**recipe, "weights": weights}, indent=2) + "\n")

    write_directory(out, write, (WEIGHTS_FILE, RECIPE_FILE))
    return out / RECIPE_FILE


def _require(cond: bool, path: Path, what: str) -> None:
    if not cond:
        raise RecipeError(f"{path} is not a valid se_inject recipe: {what}")


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _check_fields(recipe: dict[str, Any], path: Path) -> None:
    unknown = sorted(set(recipe) - set(FIELDS))
    _require(not unknown, path, f"it has fields se_inject does not write: {unknown[:5]}")
    source, options, sites, weights = (recipe.get(k) for k in ("source", "options", "sites", "weights"))
    try:
        Source.from_dict(source)
    except ValueError as e:
        raise RecipeError(f"{path} is not a valid se_inject recipe: {e}") from None
    _require(isinstance(options, dict), path, "options is missing")
    try:
        checked_options(SEOptions.from_dict(options))
    except (OptionError, TypeError) as e:
        raise RecipeError(f"{path} has invalid options: {e}") from e
    _require(isinstance(sites, list) and all(isinstance(s, str) for s in sites), path, "sites must be a list of names")
    _require(isinstance(weights, dict) and set(weights) == {"file", "sha256"} and isinstance(weights.get("file"), str)
             and isinstance(weights.get("sha256"), str), path, "weights must give a file and its sha256, only")
    _require("/" not in weights["file"] and "\\" not in weights["file"] and weights["file"] not in ("", ".", ".."),
             path, "the weights file must be a plain file name inside the directory")
    _require(_SHA256.fullmatch(weights["sha256"]) is not None, path, "weights.sha256 must be 64 hex digits")
    shape = recipe.get("example_input_shape")
    _require(shape is None or (isinstance(shape, list) and all(type(d) is int and d > 0 for d in shape)),
             path, "example_input_shape must be a list of positive integers")
    _require(shape is None or math.prod(shape) <= MAX_INPUT_ELEMENTS, path,
             f"example_input_shape {shape} asks for {math.prod(shape or [0]):,} elements, more than the "
             f"{MAX_INPUT_ELEMENTS:,} an example input needs")
    dtype = recipe.get("dtype", "float32")
    _require(isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype)
             and getattr(torch, dtype).is_floating_point, path, f"dtype {dtype!r} is not a floating torch dtype")
    versions = recipe.get("versions", {})
    _require(isinstance(versions, dict) and all(isinstance(v, str) for v in versions.values()), path,
             "versions must map library names to version strings")


def read_recipe(directory: Union[str, os.PathLike]) -> dict[str, Any]:
    """Read and validate ``recipe.json`` in ``directory`` (nothing is built or loaded).

    Raises:
        RecipeError: the file is missing, not JSON, not an se_inject recipe, of a newer format
            version, has a missing, mistyped, out-of-range or unknown field, or a source that asks
            for code, a file or a download (see :func:`se_inject.io.sources.refusal`); the message
            says which.
    """
    path = Path(directory) / RECIPE_FILE
    if not path.is_file():
        raise RecipeError(f"{path} does not exist; pass a directory written by se_inject.save / se-inject convert")
    try:
        recipe = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecipeError(f"{path} is not valid JSON (corrupt or truncated?): {e}") from e
    _require(isinstance(recipe, dict) and recipe.get("format") == FORMAT, path,
             f"it has no \"format\": \"{FORMAT}\" field (written by another tool?)")
    format_version = recipe.get("format_version")
    _require(type(format_version) is int and format_version >= 1, path,
             f"format_version must be a positive integer, got {format_version!r}")
    if format_version > FORMAT_VERSION:
        raise RecipeError(f"{path} has format version {format_version}; this se_inject reads version "
                          f"{FORMAT_VERSION}. Upgrade se_inject.")
    _check_fields(recipe, path)
    return recipe


def _build(origin: Source, where: str) -> nn.Module:
    try:
        return origin.build()
    except UnknownModelError as e:
        raise UnknownModelError(f"{where} names {origin.model!r}, which cannot be built: {e}") from None
    except RecipeError as e:
        raise RecipeError(f"{where}: {e}") from None
    except Exception as e:  # timm raises TypeError, ValueError, ... for kwargs a model does not take
        what = f"kwargs {dict(origin.kwargs)}" if origin.library == "timm" else "its config"
        raise RecipeError(f"{where}: {origin.library} cannot build {origin.model} with {what}: "
                          f"{type(e).__name__}: {first_line(e)}") from None


def _check_size(origin: Source, where: str, max_parameters: int) -> None:
    """Build the model on the meta device (nothing is allocated) and refuse it when it has more
    than ``max_parameters`` parameter and buffer elements."""
    with torch.device("meta"):
        model = _build(origin, where)
    count = sum(t.numel() for t in itertools.chain(model.parameters(), model.buffers()))
    if count > max_parameters:
        raise RecipeError(f"{where} describes a {origin.model} of {count:,} parameter and buffer elements, more "
                          f"than the {max_parameters:,} load() builds (max_parameters); pass "
                          f"max_parameters={count} if you trust this recipe")


def _example(recipe: dict[str, Any]) -> Optional[torch.Tensor]:
    """The example input a recipe's model is rebuilt with (None: the model's default one)."""
    shape, dtype = recipe.get("example_input_shape"), getattr(torch, recipe.get("dtype", "float32"))
    return torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype) if shape else None


def _rebuild(recipe: dict[str, Any], where: str, max_parameters: Optional[int] = None) -> nn.Module:
    """The model a recipe describes, with SE at the recorded sites and random weights. With
    ``max_parameters``, its size is bounded before it is allocated."""
    origin = Source.from_dict(recipe["source"])
    name = origin.model
    if max_parameters is not None:
        _check_size(origin, where, max_parameters)
    model = _build(origin, where).to(getattr(torch, recipe.get("dtype", "float32")))
    try:
        options = SEOptions.from_dict(recipe["options"])
    except OptionError as e:
        raise RecipeError(f"{where} has invalid options: {e}") from e
    result = inject(model, example_inputs=_example(recipe), **options.to_dict())
    sites = [s.name for s in result.plan.sites]
    if sites != recipe["sites"]:
        missing = sorted(set(recipe["sites"]) - set(sites))[:5]
        extra = sorted(set(sites) - set(recipe["sites"]))[:5]
        raise RecipeError(f"rebuilding {name} gives other SE sites than {where} records "
                          f"(recorded but not found: {missing}; found but not recorded: {extra}); "
                          f"the se_inject or timm version probably differs, or the kwargs do")
    return result.model


def _read_weights(directory: Path, recipe: dict[str, Any]) -> dict[str, torch.Tensor]:
    weights_path = directory / recipe["weights"]["file"]
    if not weights_path.is_file():
        raise RecipeError(f"{weights_path} does not exist; the recipe needs its weights file beside it")
    if _sha256(weights_path) != recipe["weights"]["sha256"]:
        raise RecipeError(f"{weights_path} does not match the SHA-256 recorded in the recipe "
                          f"(corrupt, truncated or replaced)")
    try:
        with safetensors.safe_open(str(weights_path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for bad headers and sizes
        raise RecipeError(f"{weights_path} is not a readable safetensors file: {e}") from e


def load(directory: Union[str, os.PathLike], *, max_parameters: Optional[int] = MAX_PARAMETERS) -> nn.Module:
    """Rebuild a model saved by :func:`save` (or ``se-inject convert``) and load its weights.

    The recipe is validated (:func:`read_recipe`) and the weights file checked against its
    checksum and the recipe's dtype; the model is built on the meta device and its size bounded
    by ``max_parameters``, then built for real with random weights (timm's ``pretrained=False``,
    or the transformers class from its recorded config, offline) and cast to the recorded dtype,
    SE is applied with the recorded options, the sites are checked against the recorded list, and
    the weights are loaded strictly from safetensors: every tensor with its name, shape and
    dtype. Nothing but the recipe and its weights file is read, and no code from them runs.
    Returns the model in eval mode.

    Args:
        directory: what :func:`save` wrote.
        max_parameters: the most parameter and buffer elements the recipe's model may have
            (:data:`MAX_PARAMETERS` by default); None for no bound.

    Raises:
        RecipeError: the recipe is invalid (see :func:`read_recipe`), asks for a model larger
            than ``max_parameters`` or a class that is not a concrete model, the weights file is
            missing, corrupt, truncated or does not match the recipe's checksum or dtype, or its
            tensors do not match the model (missing, extra, mis-shaped or mistyped tensors are
            named).
        UnknownModelError: the recipe names a model this timm (or transformers) does not have.
        OptionError: ``max_parameters`` is not a positive integer or None.
    """
    if max_parameters is not None and (type(max_parameters) is not int or max_parameters < 1):
        raise OptionError(f"max_parameters must be a positive integer or None, got {max_parameters!r}")
    directory = Path(directory)
    recipe = read_recipe(directory)
    path = directory / recipe["weights"]["file"]
    tensors = _read_weights(directory, recipe)
    _check_recipe_dtype(recipe, tensors, path)
    model = _rebuild(recipe, f"the recipe in {directory}", max_parameters)
    _load_exact(model, tensors, path)
    return model.eval()


def _check_recipe_dtype(recipe: dict[str, Any], tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """The weights' floating tensors must all have the recipe's dtype (checked before building)."""
    dtype = recipe.get("dtype", "float32")
    held = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values() if t.is_floating_point()})
    if held and held != [dtype]:
        raise RecipeError(f"{path.parent / RECIPE_FILE} records dtype {dtype!r} but the weights in {path.name} hold "
                          f"{' and '.join(held)} tensors; the recipe was edited or belongs to other weights")


def _load_exact(model: nn.Module, tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    expected = model.state_dict(keep_vars=True)
    # safetensors stores one copy of tied tensors; the model's other names for them are aliases.
    aliases = {k for k, v in expected.items() if k not in tensors and any(
        v is expected[j] for j in tensors if j in expected)}
    mismatch = describe_mismatch(expected, tensors, aliases=aliases, dtypes=True)
    if mismatch:
        raise RecipeError(f"{path} does not match the model: {mismatch}")
    model.load_state_dict(dict(tensors), strict=False)
