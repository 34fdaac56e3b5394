"""timm's attention models out of their plain counterparts, and what each position costs.

    python examples/attention_table.py

Prints two markdown tables (random weights, a 64x64 example input, a few minutes on a CPU):
parameter counts of ``se_inject.apply(plain, attn=..., position=...)`` next to timm's hand-written
attention model, and the sites / added parameters of every attention at every position on
resnet50 and convnext_tiny (the SE paper's integration study, on any backbone).
"""

import warnings

import timm
import torch

import se_inject
from se_inject.options import POSITIONS

PAIRS = [("resnet50d", "ecaresnet50d", dict(attn="eca")), ("resnet26t", "ecaresnet26t", dict(attn="eca")),
         ("resnet33ts", "seresnet33ts", dict(attn="se", position="mid")),
         ("resnet33ts", "gcresnet33ts", dict(attn="gca", position="mid")),
         ("resnet33ts", "eca_resnet33ts", dict(attn="eca", position="mid"))]


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    warnings.filterwarnings("ignore")
    x = torch.randn(1, 3, 64, 64)
    print("| plain | options | timm model | params, se_inject | params, timm |\n|---|---|---|---:|---:|")
    for plain, ref, kwargs in PAIRS:
        model = se_inject.apply(timm.create_model(plain), example_inputs=x, **kwargs)
        options = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        print(f"| {plain} | {options} | {ref} | {count(model):,} | {count(timm.create_model(ref)):,} |")
    print("\n| model | attn | " + " | ".join(POSITIONS) + " |\n|---|---|" + "---:|" * 5)
    for name in ("resnet50", "convnext_tiny"):
        base = timm.create_model(name)
        for attn in ("se", "eca", "gc", "cbam"):
            cells = []
            for position in POSITIONS:
                result = se_inject.inject(base, example_inputs=x, attn=attn, position=position)
                cells.append(f"{len(result.plan.sites)} / {count(result.model) - count(base):,}")
            print(f"| {name} | {attn} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
