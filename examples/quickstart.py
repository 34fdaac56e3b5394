"""Quickstart: put SE into timm's ResNet-50 and check the result against timm's SE-ResNet-50.

Runs on the CPU with random weights in a few seconds: python examples/quickstart.py
"""

import timm
import torch

import se_inject


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    model = timm.create_model("resnet50", pretrained=False).eval()

    # 1. Dry run: where would SE go, and what would be left alone?
    plan = se_inject.find_sites(model, reduction=16)
    print(f"{len(plan.sites)} residual adds get an SE block, {len(plan.skipped)} adds are skipped")
    for site in plan.sites[:3]:
        print(f"  {site.name:<14} C={site.channels:<5} hidden={site.hidden:<4} shortcut: {site.shortcut}")

    # 2. Insert SE. The model keeps its class; the new keys are exactly timm's seresnet50 keys.
    se_model = se_inject.apply(model, reduction=16).eval()
    print(f"{type(se_model).__name__}: {n_params(model):,} -> {n_params(se_model):,} parameters")
    native = timm.create_model("seresnet50", pretrained=False).eval()
    se_model.load_state_dict(native.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        gap = (se_model(x) - native(x)).abs().max().item()
    print(f"same weights as timm's seresnet50 -> max |output difference| = {gap:.2e}")
    assert gap < 1e-5

    # 3. For fine-tuning a pretrained network: SE blocks that start as an exact identity.
    warm = se_inject.apply(model, identity_init=True).eval()
    with torch.no_grad():
        gap = (warm(x) - model(x)).abs().max().item()
    print(f"identity_init=True -> max |output difference| from the original = {gap:.2e}")
    assert gap < 1e-4


if __name__ == "__main__":
    main()
