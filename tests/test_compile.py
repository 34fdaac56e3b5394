"""Injected models compile whole with torch.compile and export with torch.export."""

import pytest
import torch
import torchvision

import se_inject

pytestmark = pytest.mark.slow

MODELS = {
    "resnet18": torchvision.models.resnet18,
    "mobilenet_v2": torchvision.models.mobilenet_v2,
    "convnext_tiny": torchvision.models.convnext_tiny,
}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", list(MODELS))
def test_compile_fullgraph_matches_eager(name):
    x = torch.randn(2, 3, 32, 32)
    model = se_inject.apply(MODELS[name](num_classes=10), example_inputs=x[:1]).eval()
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


def test_compiled_training_step_matches_eager_gradients():
    # float64: in float32, inductor's equally valid rounding flips a few BatchNorm/ReLU kinks of a
    # batch of 4 and moves some gradients by percents, which would hide a real error.
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    model = se_inject.apply(torchvision.models.resnet18(num_classes=10), example_inputs=x[:1].float())
    model = model.double().train()
    torch.compile(model, fullgraph=True)(x).square().mean().backward()
    compiled = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(x).square().mean().backward()
    assert any(".se." in n for n in compiled)
    for n, p in model.named_parameters():
        torch.testing.assert_close(compiled[n], p.grad, rtol=1e-9, atol=1e-12, msg=n)


def test_export_matches_eager():
    x = torch.randn(2, 3, 32, 32)
    model = se_inject.apply(torchvision.models.resnet18(num_classes=10), example_inputs=x[:1]).eval()
    exported = torch.export.export(model, (x,))
    assert any("se.fc1.weight" in name for name in exported.state_dict)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x), rtol=1e-5, atol=1e-5)
