"""Where a model comes from, so that a recipe can build it again: a timm model name with its
keyword arguments, or a Hugging Face transformers class with its whole config.

A :class:`Source` builds its model offline with random weights (:meth:`Source.build`) and is
recorded in a recipe as JSON (:meth:`Source.to_dict` / :meth:`Source.from_dict`)::

    {"library": "timm", "model": "resnet50", "kwargs": {"num_classes": 10}}
    {"library": "transformers", "model": "ResNetForImageClassification", "config": {...}}

A Hugging Face model given on the command line is a local directory holding ``config.json``
(what ``save_pretrained`` writes), with or without weights (:func:`from_hf_directory`).
transformers is imported only when such a source is used.

What a recipe or a model directory may ask for is checked before anything is built
(:func:`refusal`): a source names a model, its options and nothing else, so nothing it says may run
code, read a file or download. transformers reads configs with ``trust_remote_code=False``, and a
config with an ``auto_map`` (code shipped beside the config) is refused outright. timm kwargs are
checked by an allow-list of value types and a deny-list of names: a kwarg is recorded only as a
JSON number, string, boolean, null or (nested) list of them, because an object value (timm's
``pretrained_cfg_overlay``, a ``model_args`` dict) can carry file or url entries to a builder se_inject
cannot see into; a name that reads a file or the network (``pretrained``, ``pretrained_cfg*``,
``checkpoint_path``, ``cache_dir``, any ``*_path`` / ``*_file`` / ``*_dir`` / ``*_url``, anything
about a hub, a cache or remote code) is refused unless its value is empty or false; and no string
may name a location (a ``/`` or ``\\``, ``~``, or a scheme such as ``hf-hub:``, ``local-dir:``,
``https:``). A transformers config is a nested object by nature (sub-configs, label maps), so it is
walked with the same name and string rules, label maps excepted, and a ``backbone`` that
transformers would look up by name on the Hub is refused. The builder itself checks what it
accepts: an unknown kwarg makes it raise, which is reported as a :class:`RecipeError`.
"""

from __future__ import annotations

import difflib
import inspect
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from torch import nn

from ..errors import CheckpointError, RecipeError, UnknownModelError
from ..trace.hf import is_hf_model
from ..utils import first_line

__all__ = ["Source", "timm_source", "hf_source", "is_hf_directory", "from_hf_directory", "refusal",
           "resolve_models"]

LIBRARIES = ("timm", "transformers")
# Keys of a transformers config that say where it was read from, not what the model is.
_MACHINE_KEYS = ("_name_or_path", "_commit_hash")

# See the module docstring. Names whose value would make a builder run code, read a file or download:
_CODE_KEYS = frozenset({"auto_map", "trust_remote_code", "custom_pipelines"})
_IO_WORDS = frozenset({"pretrained", "checkpoint", "cache", "hub", "download", "url", "uri", "remote", "repo"})
_IO_LAST_WORDS = frozenset({"path", "file", "files", "dir", "directory", "folder"})
# A string that names a place rather than a thing: a path, a home directory, a scheme or source prefix.
_LOCATION = re.compile(r"[/\\]|^~|^[A-Za-z][A-Za-z0-9+.-]*:")
# Config keys whose strings are free text transformers never reads as a name (class labels).
_LABEL_KEYS = frozenset({"id2label", "label2id", "label_names"})
# Config keys that hold metadata transformers never reads when building, by model type.
_DATA_KEYS = {"timm_wrapper": frozenset({"pretrained_cfg"})}
_SCALARS = (str, int, float, bool, type(None))


def _reads_files(name: str) -> bool:
    words = name.lower().strip("_").split("_")
    return bool(_IO_WORDS.intersection(words)) or words[-1] in _IO_LAST_WORDS


def _location(value: Any) -> bool:
    return isinstance(value, str) and bool(_LOCATION.search(value))


def _timm_refusal(kwargs: Mapping[str, Any], prefix: str) -> Optional[str]:
    for name, value in kwargs.items():
        where = f"{prefix}.{name}"
        if not isinstance(name, str) or not name.isidentifier():
            return f"{prefix} has the key {name!r}, which is not a keyword argument name"
        if (name in _CODE_KEYS or _reads_files(name)) and value:
            return (f"{where}={value!r} would make timm read a file or download; se_inject builds models "
                    f"offline from their name and options and reads only the weights beside the recipe: drop it")
        stack = [value]
        while stack:
            item = stack.pop()
            if isinstance(item, list):
                stack.extend(item)
            elif not isinstance(item, _SCALARS):
                return (f"{where} is a {type(item).__name__}: timm kwargs are recorded only as numbers, strings, "
                        f"booleans, null and lists of them")
            elif _location(item):
                return f"{where}={value!r} names a file or a hub location; a recipe records no locations"
    return None


def _config_refusal(config: Mapping[str, Any], prefix: str) -> Optional[str]:
    stack: list[tuple[str, Any, Optional[str]]] = [(prefix, config, None)]
    while stack:
        where, item, model_type = stack.pop()
        if isinstance(item, list):
            stack.extend((f"{where}[{i}]", v, model_type) for i, v in enumerate(item))
            continue
        if not isinstance(item, Mapping):
            if _location(item):
                return f"{where}={item!r} names a file or a hub location; se_inject reads no other files"
            continue
        model_type = item.get("model_type", model_type)
        for key, value in item.items():
            path = f"{where}.{key}"
            if key in _MACHINE_KEYS or key in _LABEL_KEYS or key in _DATA_KEYS.get(model_type, ()) or not value:
                continue
            if key in _CODE_KEYS:
                return (f"{path} asks to run code from the model's files ({value!r}); se_inject never runs such "
                        f"code (trust_remote_code is off): use a model class that transformers ships")
            if key == "backbone" and model_type != "timm_backbone":
                return (f"{path}={value!r} names a backbone that transformers would look up on the Hugging Face "
                        f"Hub; give its backbone_config instead")
            if isinstance(key, str) and _reads_files(key):
                return (f"{path}={value!r} would make transformers read a file or download; se_inject builds "
                        f"models offline from their config and reads only their own weights: drop it")
            stack.append((path, value, model_type))
    return None


def refusal(source: Mapping[str, Any], prefix: str = "source") -> Optional[str]:
    """Why the source ``source`` (its JSON form, see :meth:`Source.to_dict`) asks for more than a
    model (code to run, a file to read, something to download), or None if it does not.

    ``prefix`` starts the field paths named in the reason (``source.kwargs.checkpoint_path``).
    """
    if source.get("library") == "timm":
        name = source.get("model")
        if _location(name):
            return f"{prefix}.model={name!r} names a hub or file location; a recipe names a registered timm model"
        return _timm_refusal(source.get("kwargs") or {}, f"{prefix}.kwargs")
    return _config_refusal(source.get("config") or {}, f"{prefix}.config")


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
        extra = set(data) - {"library", "model", "kwargs" if data["library"] == "timm" else "config"}
        if extra:
            raise ValueError(f"source has fields se_inject does not write: {sorted(extra)}")
        if data["library"] == "timm":
            if not isinstance(data.get("kwargs", {}), dict):
                raise ValueError("source.kwargs must be an object")
        else:
            config = data.get("config")
            if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
                raise ValueError("source.config must be a transformers config with a model_type")
        reason = refusal(data)
        if reason:
            raise RecipeError(reason)
        if data["library"] == "timm":
            return cls("timm", data["model"], kwargs=data.get("kwargs", {}))
        return cls("transformers", data["model"], config=data["config"])

    def versions(self) -> dict[str, str]:
        """The version of the library that builds the model, for the recipe."""
        if self.library == "transformers":
            import transformers

            return {"transformers": transformers.__version__}
        return {}

    def build(self) -> nn.Module:
        """The model with random weights, built offline (under ``torch.device("meta")`` it
        allocates nothing, which is how :func:`se_inject.load` bounds its size first).

        Raises:
            UnknownModelError: the library has no such model (or class, or model type).
            RecipeError: the transformers class is not a concrete model taking this config.
        """
        if self.library == "timm":
            import timm

            if not timm.is_model(self.model):
                raise UnknownModelError(f"timm {timm.__version__} has no model {self.model!r}")
            return timm.create_model(self.model, pretrained=False, **self.kwargs)
        config = _hf_config(dict(self.config))
        return _hf_class(self.model, "source.model", config)(config)


def timm_source(name: str, kwargs: Optional[Mapping[str, Any]] = None) -> Source:
    """The source of ``timm.create_model(name, **kwargs)``; the kwargs must be JSON."""
    kwargs = dict(kwargs or {})
    try:
        json.dumps(kwargs)
    except TypeError as e:
        raise RecipeError(f"model_kwargs must be JSON-serialisable to be recorded: {e}") from e
    reason = refusal({"library": "timm", "model": name, "kwargs": kwargs}, prefix="model")
    if reason:
        raise RecipeError(f"cannot record this source: {reason}")
    return Source("timm", name, kwargs=kwargs)


def hf_source(model: nn.Module) -> Source:
    """The source of a transformers model: its class and its whole config."""
    if not is_hf_model(model):
        raise RecipeError(f"{type(model).__name__} is not a transformers model; pass model_name= for a timm model")
    config = {k: v for k, v in model.config.to_dict().items() if k not in _MACHINE_KEYS}
    reason = _config_refusal(config, "config")
    if reason:
        raise RecipeError(f"cannot record {type(model).__name__}'s config: {reason}")
    return Source("transformers", type(model).__name__, config=config)


def _hf_config(data: dict[str, Any]) -> Any:
    import transformers

    model_type = data.get("model_type")
    if model_type not in transformers.CONFIG_MAPPING:
        raise UnknownModelError(f"transformers {transformers.__version__} has no model type {model_type!r}")
    return transformers.CONFIG_MAPPING[model_type].from_dict(data)


def _hf_class(name: str, field: str, config: Any) -> type:
    """The transformers model class ``name`` (named by ``field``), which must be a concrete model
    that takes ``config``."""
    import transformers

    cls = getattr(transformers, name, None) if name.isidentifier() else None
    if not isinstance(cls, type):
        raise UnknownModelError(f"transformers {transformers.__version__} has no model class {name!r}")
    if not (issubclass(cls, transformers.PreTrainedModel) and cls.forward is not nn.Module.forward
            and not inspect.isabstract(cls)):
        raise RecipeError(f"{field} is {name!r}, which is not a concrete transformers model (a base class, an "
                          f"Auto class or no model at all); name the class the model was built as, e.g. "
                          f"ResNetForImageClassification")
    if cls.config_class is not None and not isinstance(config, cls.config_class):
        raise RecipeError(f"{field} is {name}, which takes a {cls.config_class.__name__}, but the config is a "
                          f"{type(config).__name__} (model_type {config.model_type!r}); name a {config.model_type} "
                          f"class")
    return cls


def is_hf_directory(path: Union[str, os.PathLike]) -> bool:
    """Whether ``path`` is a directory holding a transformers ``config.json``."""
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def _weights_in(directory: Path) -> bool:
    return any(directory.glob("*.safetensors")) or any(directory.glob("pytorch_model*.bin"))


def _read_config(directory: Path) -> Any:
    """The config in ``directory``, read by transformers offline with ``trust_remote_code=False``
    after :func:`refusal`'s checks of the JSON itself."""
    import transformers

    if not is_hf_directory(directory):
        raise UnknownModelError(f"{directory} holds no config.json (a transformers save_pretrained directory)")
    path = directory / "config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UnknownModelError(f"{path} is not a config transformers can read: {type(e).__name__}: "
                                f"{first_line(e)}") from None
    if not isinstance(data, dict):
        raise UnknownModelError(f"{path} is not a config transformers can read: it holds no JSON object")
    reason = _config_refusal(data, "config.json")
    if reason:
        raise RecipeError(f"{directory}: {reason}")
    try:
        return transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
    except Exception as e:
        raise UnknownModelError(f"{path} is not a config transformers can read: "
                                f"{type(e).__name__}: {first_line(e)}") from None


def from_hf_directory(directory: Union[str, os.PathLike], *, num_labels: Optional[int] = None,
                      weights: bool = True) -> nn.Module:
    """The transformers model saved in ``directory`` (``save_pretrained``), built offline.

    Its class is the config's ``architectures[0]`` (else the image-classification class of its
    model type). The weights in the directory are loaded when ``weights`` and there are any, and
    must match the model exactly; otherwise the weights are random. ``num_labels`` gives the model
    a new, random classifier of that size.

    Nothing in the directory runs: transformers reads it with ``trust_remote_code=False``, and a
    config that asks for code (``auto_map``), a download or another file is refused before
    transformers reads it (see :func:`refusal`).

    Raises:
        UnknownModelError: no config, or a model type or class transformers does not have.
        RecipeError: the config asks for code, a file or a download, or names a class that is not
            a concrete model.
        CheckpointError: the weights are unreadable or do not match the model.
    """
    import transformers

    directory = Path(directory)
    config = _read_config(directory)
    path = directory / "config.json"
    name = (config.architectures or [None])[0]
    if name is None:
        mapping = transformers.models.auto.modeling_auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES
        name = mapping.get(config.model_type)
        name = name[0] if isinstance(name, (list, tuple)) else name
        if name is None:
            raise UnknownModelError(f"{directory}/config.json names no architecture, and {config.model_type!r} "
                                    f"has no image-classification class")
    cls = _hf_class(name, f"the architecture in {path}", config)
    changed = {} if num_labels is None else {"num_labels": num_labels}
    if not (weights and _weights_in(directory)):
        for key, value in changed.items():
            setattr(config, key, value)
        return cls(config)
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        model, info = cls.from_pretrained(str(directory), local_files_only=True, output_loading_info=True,
                                          trust_remote_code=False, ignore_mismatched_sizes=bool(changed),
                                          **changed)
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


def resolve_models(names: Sequence[str]) -> list[str]:
    """Expand globs and check every name against timm; raise UnknownModelError with suggestions.

    A name that is an existing directory holding ``config.json`` is a Hugging Face model and kept.
    """
    import timm

    resolved: list[str] = []
    for name in names:
        if Path(name).is_dir():
            if not is_hf_directory(name):
                raise UnknownModelError(f"{name} is a directory without config.json; a Hugging Face model "
                                        f"directory is what save_pretrained writes")
            resolved.append(name)
        elif any(c in name for c in "*?["):
            matches = timm.list_models(name)
            if not matches:
                raise UnknownModelError(f"no timm model matches {name!r}")
            resolved.extend(matches)
        elif timm.is_model(name):
            resolved.append(name)
        else:
            close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
            raise UnknownModelError(f"unknown model {name!r}{hint}")
    return list(dict.fromkeys(resolved))
