"""Save a converted model as safetensors weights plus a JSON recipe, and load it back.

Nothing is pickled: the structure is rebuilt from the recipe (the timm model name and kwargs, or the
transformers class and config, see :mod:`se_inject.sources`; then :func:`se_inject.inject` with the
recorded options), the weights are read with safetensors, and both are checked: the sites must be the recorded ones, every tensor must be there with its shape,
and the weights file must have the recorded SHA-256.

A saved directory holds ``recipe.json`` and ``model.safetensors``::

    {"format": "se_inject.recipe", "format_version": 1,
     "source": {"library": "timm", "model": "resnet50", "kwargs": {}},
     (or "source": {"library": "transformers", "model": "ResNetForImageClassification", "config": {...}}),
     "options": {"reduction": 16, "rd_divisor": 8, ...}, "example_input_shape": [1, 3, 224, 224],
     "dtype": "float32", "sites": ["layer1.0.se", ...],
     "weights": {"file": "model.safetensors", "sha256": "..."},
     "versions": {"se_inject": "...", "torch": "...", "timm": "...", "torchvision": "..."}}

:func:`save` rebuilds the model from what the recipe will say before it writes anything, so a
wrong model name or kwargs never produce a directory that cannot be loaded; it writes both files
beside their final names and renames them into place, so a failure leaves a previous save whole.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import safetensors
import safetensors.torch
import timm
import torch
import torchvision
from torch import nn

from .api import inject
from .errors import OptionError, RecipeError, UnknownModelError
from .options import SEOptions
from .plan import Injection
from .sources import Source, source_for
from .utils import describe_mismatch, first_line, version

__all__ = ["save", "load", "read_recipe", "RECIPE_FILE", "WEIGHTS_FILE", "FORMAT", "FORMAT_VERSION",
           "MAX_INPUT_ELEMENTS"]

RECIPE_FILE = "recipe.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "se_inject.recipe"
FORMAT_VERSION = 1
#: The largest example input a recipe may ask :func:`load` to allocate (elements).
MAX_INPUT_ELEMENTS = 1 << 26


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _dtype_of(model: nn.Module) -> str:
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    return str(param.dtype if param is not None else torch.float32).removeprefix("torch.")


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


def _check_rebuilds(result: Injection, recipe: dict[str, Any]) -> None:
    """Rebuild the model from ``recipe`` and compare it with ``result.model``: same sites, same
    tensor names, shapes and dtypes. Raises RecipeError saying what differs."""
    source = recipe["source"]
    given = (f"model_name={source['model']!r} with model_kwargs={source['kwargs']}" if source["library"] == "timm"
             else f"{source['model']} with its config")
    rebuilt = _rebuild(recipe, f"the source given to save ({given})")
    mismatch = describe_mismatch(rebuilt.state_dict(), result.model.state_dict())
    if mismatch:
        raise RecipeError(f"{given} does not rebuild this model ({mismatch}); pass the name and kwargs it was "
                          f"created with")


def _write_atomically(model: nn.Module, recipe: dict[str, Any], out: Path) -> Path:
    """Write the weights and the recipe beside their final names, then rename both into place."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".se_inject-") as tmp:
        weights_tmp, recipe_tmp = Path(tmp) / WEIGHTS_FILE, Path(tmp) / RECIPE_FILE
        safetensors.torch.save_model(model, str(weights_tmp))
        recipe = {**recipe, "weights": {"file": WEIGHTS_FILE, "sha256": _sha256(weights_tmp)}}
        recipe_tmp.write_text(json.dumps(recipe, indent=2) + "\n")
        os.replace(weights_tmp, out / WEIGHTS_FILE)
        os.replace(recipe_tmp, out / RECIPE_FILE)
    return out / RECIPE_FILE


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
    transformers model's class and config) with the recorded options,
    and must have the same sites and tensors as ``result.model``; both files are then written
    beside their final names and renamed into place.

    Args:
        result: what :func:`se_inject.inject` returned.
        directory: where to write (created if missing).
        model_name: for a timm model, the name it was built from (``"resnet50"``).
        model_kwargs: the keyword arguments it was built with (JSON-serialisable), e.g.
            ``{"num_classes": 10}``.
        source: where the model comes from, as a :class:`se_inject.sources.Source`, instead of
            ``model_name``. A transformers model needs neither: its class and config are recorded.
        overwrite: replace a model already saved in ``directory``.

    Returns:
        The path of the recipe.

    Raises:
        RecipeError: a model is saved there and ``overwrite`` is False, ``directory`` is a file,
            the kwargs are not JSON, an option cannot be recorded, or the name and kwargs do not
            rebuild the model, or nothing says how to build it again.
        UnknownModelError: ``model_name`` is not a timm model (or the class not a transformers one).
    """
    origin = source_for(result.model, model_name, model_kwargs, source)
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise RecipeError(f"{out} is a file; pass a directory to save into")
    if not overwrite and ((out / RECIPE_FILE).exists() or (out / WEIGHTS_FILE).exists()):
        raise RecipeError(f"{out} already holds a saved model; pass overwrite=True (--overwrite) to replace it")
    recipe = _recipe(result, origin)
    _check_rebuilds(result, recipe)
    return _write_atomically(result.model, recipe, out)


def _require(cond: bool, path: Path, what: str) -> None:
    if not cond:
        raise RecipeError(f"{path} is not a valid se_inject recipe: {what}")


def _check_fields(recipe: dict[str, Any], path: Path) -> None:
    source, options, sites, weights = (recipe.get(k) for k in ("source", "options", "sites", "weights"))
    try:
        Source.from_dict(source)
    except ValueError as e:
        raise RecipeError(f"{path} is not a valid se_inject recipe: {e}") from None
    _require(isinstance(options, dict), path, "options is missing")
    _require(isinstance(sites, list) and all(isinstance(s, str) for s in sites), path, "sites must be a list of names")
    _require(isinstance(weights, dict) and isinstance(weights.get("file"), str)
             and isinstance(weights.get("sha256"), str), path, "weights must give a file and its sha256")
    _require("/" not in weights["file"] and "\\" not in weights["file"] and weights["file"] not in ("", ".", ".."),
             path, "the weights file must be a plain file name inside the directory")
    shape = recipe.get("example_input_shape")
    _require(shape is None or (isinstance(shape, list) and all(type(d) is int and d > 0 for d in shape)),
             path, "example_input_shape must be a list of positive integers")
    _require(shape is None or math.prod(shape) <= MAX_INPUT_ELEMENTS, path,
             f"example_input_shape {shape} asks for {math.prod(shape or [0]):,} elements, more than the "
             f"{MAX_INPUT_ELEMENTS:,} an example input needs")
    dtype = recipe.get("dtype", "float32")
    _require(isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype)
             and getattr(torch, dtype).is_floating_point, path, f"dtype {dtype!r} is not a floating torch dtype")


def read_recipe(directory: Union[str, os.PathLike]) -> dict[str, Any]:
    """Read and validate ``recipe.json`` in ``directory`` (nothing is built or loaded).

    Raises:
        RecipeError: the file is missing, not JSON, not an se_inject recipe, of a newer format
            version, or has a missing, mistyped or out-of-range field; the message says which.
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
    _require(isinstance(format_version, int), path, "format_version is missing")
    if format_version > FORMAT_VERSION:
        raise RecipeError(f"{path} has format version {format_version}; this se_inject reads version "
                          f"{FORMAT_VERSION}. Upgrade se_inject.")
    _check_fields(recipe, path)
    return recipe


def _rebuild(recipe: dict[str, Any], where: str) -> nn.Module:
    """The model a recipe describes, with SE at the recorded sites and random weights."""
    origin = Source.from_dict(recipe["source"])
    name = origin.model
    try:
        model = origin.build()
    except UnknownModelError as e:
        raise UnknownModelError(f"{where} names {name!r}, which cannot be built: {e}") from None
    except Exception as e:  # timm raises TypeError, ValueError, ... for kwargs a model does not take
        what = f"kwargs {dict(origin.kwargs)}" if origin.library == "timm" else "its config"
        raise RecipeError(f"{where}: {origin.library} cannot build {name} with {what}: "
                          f"{type(e).__name__}: {first_line(e)}") from None
    dtype = getattr(torch, recipe.get("dtype", "float32"))
    model = model.to(dtype)
    shape = recipe.get("example_input_shape")
    try:
        options = SEOptions.from_dict(recipe["options"])
    except OptionError as e:
        raise RecipeError(f"{where} has invalid options: {e}") from e
    example = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype) if shape else None
    result = inject(model, example_inputs=example, **options.to_dict())
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


def load(directory: Union[str, os.PathLike]) -> nn.Module:
    """Rebuild a model saved by :func:`save` (or ``se-inject convert``) and load its weights.

    The model is built from the recipe with random weights (timm's ``pretrained=False``, or the
    transformers class from its recorded config, offline) and cast
    to the recorded dtype (that of its first floating parameter), SE is applied with the recorded
    options, the sites are checked against the recorded list, and the weights are loaded strictly
    from safetensors. Returns the model in eval mode.

    Raises:
        RecipeError: the recipe is invalid (see :func:`read_recipe`), the weights file is missing,
            corrupt, truncated or does not match the recipe's checksum, or its tensors do not match
            the model (missing, extra or mis-shaped tensors are named).
        UnknownModelError: the recipe names a model this timm (or transformers) does not have.
    """
    directory = Path(directory)
    recipe = read_recipe(directory)
    tensors = _read_weights(directory, recipe)
    model = _rebuild(recipe, f"the recipe in {directory}")
    _load_exact(model, tensors, directory / recipe["weights"]["file"])
    return model.eval()


def _load_exact(model: nn.Module, tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    expected = model.state_dict(keep_vars=True)
    # safetensors stores one copy of tied tensors; the model's other names for them are aliases.
    aliases = {k for k, v in expected.items() if k not in tensors and any(
        v is expected[j] for j in tensors if j in expected)}
    mismatch = describe_mismatch(expected, tensors, aliases=aliases)
    if mismatch:
        raise RecipeError(f"{path} does not match the model: {mismatch}")
    model.load_state_dict(dict(tensors), strict=False)
