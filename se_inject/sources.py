"""Where a model comes from, so that a recipe can build it again: a timm model name with its
keyword arguments, or a Hugging Face transformers class with its whole config.

A :class:`Source` builds its model offline with random weights (:meth:`Source.build`) and is
recorded in a recipe as JSON (:meth:`Source.to_dict` / :meth:`Source.from_dict`)::

    {"library": "timm", "model": "resnet50", "kwargs": {"num_classes": 10}}
    {"library": "transformers", "model": "ResNetForImageClassification", "config": {...}}

A Hugging Face model given on the command line is a local directory holding ``config.json``
(what ``save_pretrained`` writes), with or without weights (:func:`from_hf_directory`).
transformers is imported only when such a source is used.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from torch import nn

from .errors import CheckpointError, RecipeError, UnknownModelError
from .hf import is_hf_model
from .utils import first_line

__all__ = ["Source", "timm_source", "hf_source", "is_hf_directory", "from_hf_directory"]

LIBRARIES = ("timm", "transformers")
# Keys of a transformers config that say where it was read from, not what the model is.
_MACHINE_KEYS = ("_name_or_path", "_commit_hash")


@dataclass(frozen=True)
class Source:
    """A model's origin: ``library`` ("timm" or "transformers"), ``model`` (the timm name or the
    transformers class name), and the timm ``kwargs`` or the transformers ``config`` dict."""

    library: str
    model: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    config: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form a recipe records."""
        if self.library == "timm":
            return {"library": "timm", "model": self.model, "kwargs": dict(self.kwargs)}
        return {"library": "transformers", "model": self.model, "config": dict(self.config)}

    @classmethod
    def from_dict(cls, data: Any) -> "Source":
        """The source a recipe records; ValueError says what is wrong with it."""
        if not isinstance(data, dict) or data.get("library") not in LIBRARIES:
            raise ValueError("source must name a timm model or a transformers class (library 'timm' or "
                             "'transformers')")
        if not isinstance(data.get("model"), str) or not data["model"]:
            raise ValueError("source.model must name the model")
        if data["library"] == "timm":
            if not isinstance(data.get("kwargs", {}), dict):
                raise ValueError("source.kwargs must be an object")
            return cls("timm", data["model"], kwargs=data.get("kwargs", {}))
        config = data.get("config")
        if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
            raise ValueError("source.config must be a transformers config with a model_type")
        return cls("transformers", data["model"], config=config)

    def versions(self) -> dict[str, str]:
        """The version of the library that builds the model, for the recipe."""
        if self.library == "transformers":
            import transformers

            return {"transformers": transformers.__version__}
        return {}

    def build(self) -> nn.Module:
        """The model with random weights, built offline.

        Raises:
            UnknownModelError: the library has no such model (or class, or model type).
        """
        if self.library == "timm":
            import timm

            if not timm.is_model(self.model):
                raise UnknownModelError(f"timm {timm.__version__} has no model {self.model!r}")
            return timm.create_model(self.model, pretrained=False, **self.kwargs)
        return _hf_class(self.model)(_hf_config(dict(self.config)))


def timm_source(name: str, kwargs: Optional[Mapping[str, Any]] = None) -> Source:
    """The source of ``timm.create_model(name, **kwargs)``; the kwargs must be JSON."""
    kwargs = dict(kwargs or {})
    try:
        json.dumps(kwargs)
    except TypeError as e:
        raise RecipeError(f"model_kwargs must be JSON-serialisable to be recorded: {e}") from e
    return Source("timm", name, kwargs=kwargs)


def hf_source(model: nn.Module) -> Source:
    """The source of a transformers model: its class and its whole config."""
    if not is_hf_model(model):
        raise RecipeError(f"{type(model).__name__} is not a transformers model; pass model_name= for a timm model")
    config = {k: v for k, v in model.config.to_dict().items() if k not in _MACHINE_KEYS}
    return Source("transformers", type(model).__name__, config=config)


def _hf_config(data: dict[str, Any]) -> Any:
    import transformers

    model_type = data.get("model_type")
    if model_type not in transformers.CONFIG_MAPPING:
        raise UnknownModelError(f"transformers {transformers.__version__} has no model type {model_type!r}")
    return transformers.CONFIG_MAPPING[model_type].from_dict(data)


def _hf_class(name: str) -> type:
    import transformers

    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise UnknownModelError(f"transformers {transformers.__version__} has no model class {name!r}")
    return cls


def is_hf_directory(path: Union[str, os.PathLike]) -> bool:
    """Whether ``path`` is a directory holding a transformers ``config.json``."""
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def _weights_in(directory: Path) -> bool:
    return any(directory.glob("*.safetensors")) or any(directory.glob("pytorch_model*.bin"))


def from_hf_directory(directory: Union[str, os.PathLike], *, num_labels: Optional[int] = None,
                      weights: bool = True) -> nn.Module:
    """The transformers model saved in ``directory`` (``save_pretrained``), built offline.

    Its class is the config's ``architectures[0]`` (else the image-classification class of its
    model type). The weights in the directory are loaded when ``weights`` and there are any, and
    must match the model exactly; otherwise the weights are random. ``num_labels`` gives the model
    a new, random classifier of that size.

    Raises:
        UnknownModelError: no config, or a model type or class transformers does not have.
        CheckpointError: the weights are unreadable or do not match the model.
    """
    import transformers

    directory = Path(directory)
    if not is_hf_directory(directory):
        raise UnknownModelError(f"{directory} holds no config.json (a transformers save_pretrained directory)")
    try:
        config = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except Exception as e:
        raise UnknownModelError(f"{directory}/config.json is not a config transformers can read: "
                                f"{type(e).__name__}: {first_line(e)}") from None
    name = (config.architectures or [None])[0]
    if name is None:
        mapping = transformers.models.auto.modeling_auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES
        name = mapping.get(config.model_type)
        name = name[0] if isinstance(name, (list, tuple)) else name
        if name is None:
            raise UnknownModelError(f"{directory}/config.json names no architecture, and {config.model_type!r} "
                                    f"has no image-classification class")
    cls = _hf_class(name)
    changed = {} if num_labels is None else {"num_labels": num_labels}
    if not (weights and _weights_in(directory)):
        for key, value in changed.items():
            setattr(config, key, value)
        return cls(config)
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        model, info = cls.from_pretrained(str(directory), local_files_only=True, output_loading_info=True,
                                          ignore_mismatched_sizes=bool(changed), **changed)
    except Exception as e:
        raise CheckpointError(f"could not load the weights in {directory}: {type(e).__name__}: "
                              f"{first_line(e)}") from None
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    allowed = ("missing_keys", "mismatched_keys") if changed else ()  # a new classifier
    problems = [f"{k.replace('_', ' ')} {sorted(map(str, v))[:5]}" for k, v in info.items() if v and k not in allowed]
    if problems:
        raise CheckpointError(f"the weights in {directory} do not match {name}: " + "; ".join(problems))
    return model


def source_for(model: nn.Module, model_name: Optional[str] = None, model_kwargs: Optional[Mapping[str, Any]] = None,
               source: Optional[Source] = None) -> Source:
    """The source :func:`se_inject.save` records: ``source`` if given, else the timm
    ``model_name`` with ``model_kwargs``, else the class and config of a transformers model."""
    if source is not None:
        if model_name is not None or model_kwargs:
            raise RecipeError("pass either source= or model_name= / model_kwargs=, not both")
        if not isinstance(source, Source):
            raise RecipeError(f"source must be a se_inject.sources.Source, got {type(source).__name__}")
        return source
    if model_name is not None:
        return timm_source(model_name, model_kwargs)
    if model_kwargs:
        raise RecipeError("model_kwargs= needs model_name= (the timm model they build)")
    if is_hf_model(model):
        return hf_source(model)
    raise RecipeError(f"save() needs to know how to build {type(model).__name__} again: pass model_name= "
                      f"(and model_kwargs=) for a timm model, or source=; a transformers model is recorded "
                      f"from its config")
