"""The public API's shape: explicit signatures, one option list, clear errors, warnings that point
at the caller's line, and exceptions that are also the built-ins a caller would catch."""

from __future__ import annotations

import dataclasses
import inspect
import warnings

import pytest
import torch
import torchvision
from torch import nn

import se_inject
from se_inject import OptionError, SEOptions
from se_inject.options import option_names
from tests.helpers import ResBlock

X = torch.randn(1, 3, 32, 32)
RUN_PARAMETERS = {"apply": ["example_inputs", "inplace", "strict"], "inject": ["example_inputs", "inplace", "strict"],
                  "find_sites": ["example_inputs", "strict"]}


@pytest.mark.parametrize("name", list(RUN_PARAMETERS))
def test_signatures_list_every_option_keyword_only(name):
    func = getattr(se_inject, name)
    params = inspect.signature(func).parameters
    assert list(params) == ["model", *option_names(), *RUN_PARAMETERS[name]]
    for option in option_names():
        p = params[option]
        assert p.kind is inspect.Parameter.KEYWORD_ONLY
        assert p.default == SEOptions.__dataclass_fields__[option].default
        assert f"{option} (default" in func.__doc__  # documented in the docstring


def test_the_option_list_is_the_dataclass_fields():
    assert option_names() == [f.name for f in dataclasses.fields(SEOptions)]
    assert all(f.metadata["doc"] for f in dataclasses.fields(SEOptions))


@pytest.mark.parametrize("func", [se_inject.apply, se_inject.inject, se_inject.find_sites])
def test_a_misspelt_option_is_an_option_error_with_a_hint(func):
    with pytest.raises(OptionError, match=r"got an unknown option 'reductoin'; did you mean 'reduction'\?"):
        func(nn.Sequential(ResBlock(3, 3)), reductoin=8)
    with pytest.raises(OptionError, match=r"unknown option 'colour'; the options are reduction, rd_divisor"):
        func(nn.Sequential(ResBlock(3, 3)), colour="red")


def test_find_sites_says_why_it_takes_no_inplace():
    with pytest.raises(OptionError, match=r"find_sites\(\) never changes the model.*apply\(\) and inject\(\) do"):
        se_inject.find_sites(nn.Sequential(ResBlock(3, 3)), inplace=True)


def test_options_round_trip_through_their_json_form():
    options = SEOptions(reduction=8, rd_divisor=None, act_layer="silu", identity_init=True, include="layer4.*",
                        exclude=["layer4.0"], min_channels=32)
    data = options.to_dict()
    assert data == {"reduction": 8, "rd_divisor": None, "act_layer": "silu", "gate_layer": "sigmoid",
                    "identity_init": True, "include": ["layer4.*"], "exclude": ["layer4.0"], "min_channels": 32,
                    "fuse_residual": True, "kernels": "auto"}
    assert SEOptions.from_dict(data) == options
    assert options.replace(reduction=4).reduction == 4
    with pytest.raises(OptionError, match="act_layer=.*SiLU.*is a class"):
        SEOptions(act_layer=nn.SiLU).to_dict()
    with pytest.raises(OptionError, match="unknown option 'size'"):
        SEOptions.from_dict({"size": 3})


@pytest.mark.parametrize("entry", ["apply", "inject"])
def test_warnings_point_at_the_callers_line(entry):
    model = torchvision.models.vgg11()
    with pytest.warns(se_inject.NoResidualAddsWarning) as caught:
        getattr(se_inject, entry)(model, example_inputs=X)
    assert caught[0].filename == __file__


@pytest.mark.parametrize("error, builtin", [
    (se_inject.NotAModuleError, TypeError), (se_inject.OptionError, ValueError),
    (se_inject.TraceError, RuntimeError), (se_inject.ExampleInputError, ValueError),
    (se_inject.VerificationError, RuntimeError), (se_inject.RecipeError, ValueError),
    (se_inject.CheckpointError, ValueError), (se_inject.UnknownModelError, ValueError),
    (se_inject.NoResidualAddsError, ValueError), (se_inject.BenchError, RuntimeError),
])
def test_every_error_is_also_the_builtin_a_caller_would_catch(error, builtin):
    assert issubclass(error, se_inject.SEInjectError) and issubclass(error, builtin)


def test_the_public_namespace_holds_no_internals():
    assert all(not name.startswith("_") or name == "__version__" for name in se_inject.__all__)
    for name in se_inject.__all__:
        assert hasattr(se_inject, name), name
    assert se_inject.__version__ == __import__("importlib.metadata").metadata.version("se-inject")


def test_the_version_comes_from_the_installed_metadata():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert se_inject.__version__ and se_inject.__version__ != "0+unknown"
