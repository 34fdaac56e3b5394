"""Shared helpers for the tests: small models with known residual structure, graph checks, and the
model pairs (timm's hand-written twins) that several test files use."""

from __future__ import annotations

import copy
from typing import Iterator

import torch
from torch import fx, nn

from se_inject import SEBlock, SitePlan
from se_inject.trace.ops import add_operands


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def snapshot(model: nn.Module) -> dict:
    """Everything about a model that se_inject must leave alone."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "modules": [(name, type(m)) for name, m in model.named_modules()],
        "training": [m.training for m in model.modules()],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()],
        "attrs": [sorted(vars(m)) for m in model.modules()],
    }


def assert_same_snapshot(before: dict, after: dict) -> None:
    assert before["modules"] == after["modules"]
    assert before["training"] == after["training"]
    assert before["hooks"] == after["hooks"]
    assert before["attrs"] == after["attrs"]
    assert before["state"].keys() == after["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(value, after["state"][key]), key


def upstream(node: fx.Node) -> set[fx.Node]:
    """``node`` and every node it reads, directly or not."""
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def residual_adds_with_se(model: nn.Module, plan: SitePlan) -> Iterator[tuple[str, fx.GraphModule, fx.Node, fx.Node, fx.Node]]:
    """For each site: (site name, block, SE node, branch operand, shortcut operand) after rewriting.

    The add is the first add (in graph order) that reads the SE output through one operand; an SE
    block that does the residual add itself (``se(branch, shortcut)``) is its own add.
    """
    for site in plan.sites:
        gm = model.get_submodule(site.block) if site.block else model
        assert isinstance(gm, fx.GraphModule), site.block
        local = site.name.rsplit(".", 1)[-1]
        (se_node,) = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == local]
        assert isinstance(gm.get_submodule(local), SEBlock)
        if len(se_node.args) == 2:
            yield site.name, gm, se_node, se_node.args[0], se_node.args[1]
            continue
        for node in gm.graph.nodes:
            operands = add_operands(node)
            if operands and any(isinstance(o, fx.Node) and se_node in upstream(o) for o in operands):
                break
        else:
            raise AssertionError(f"{site.name}: no add reads the SE output")
        a, b = operands
        branch, shortcut = (a, b) if se_node in upstream(a) else (b, a)
        yield site.name, gm, se_node, branch, shortcut


def assert_shortcuts_untouched(model: nn.Module, plan: SitePlan) -> None:
    """Every SE reads a branch and feeds its add; no SE lies on a path that only the shortcut takes.

    (An SE of an *earlier* residual add in the same graph feeds both operands of a later add: it is
    upstream of the fork, not on the shortcut.)
    """
    checked = 0
    for name, gm, se_node, branch, shortcut in residual_adds_with_se(model, plan):
        fused = len(se_node.args) == 2
        assert se_node.args[0] is branch if fused else se_node in upstream(branch), name
        shortcut_only = upstream(shortcut) - upstream(branch)
        for n in shortcut_only:
            if n.op == "call_module":
                assert not isinstance(gm.get_submodule(n.target), SEBlock), f"{name}: SE on the shortcut"
        checked += 1
    assert checked == len(plan.sites)


class ResBlock(nn.Module):
    """conv-bn-relu-conv-bn + shortcut; ``spelling`` picks how the add is written."""

    def __init__(self, cin: int, cout: int, stride: int = 1, spelling: str = "plus", dims: int = 2) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
        self.conv1 = conv(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm(cout)
        self.relu = nn.ReLU()
        self.conv2 = conv(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(conv(cin, cout, 1, stride, bias=False), norm(cout))
        self.spelling = spelling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        if self.spelling == "plus":
            out = out + shortcut
        elif self.spelling == "reversed":
            out = shortcut + out
        elif self.spelling == "torch.add":
            out = torch.add(out, shortcut)
        elif self.spelling == "iadd":
            out += shortcut
        elif self.spelling == "add_":
            out.add_(shortcut)
        return self.relu(out)


def small_resnet(dims: int = 2, spelling: str = "plus") -> nn.Sequential:
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    return nn.Sequential(
        conv(3, 16, 3, padding=1),
        ResBlock(16, 16, spelling=spelling, dims=dims),
        ResBlock(16, 32, stride=2, spelling=spelling, dims=dims),
        ResBlock(32, 32, spelling=spelling, dims=dims),
    )


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give BatchNorm layers non-trivial statistics so that eval outputs are not degenerate."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def deepcopy_eval(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).eval()


# -- a DLA-like net: a block called with an argument it ignores, a block nested in a block ----------

class Leaf(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x, shortcut):
        return torch.relu(self.bn(self.conv2(torch.relu(self.conv1(x)))) + shortcut)


class Mid(nn.Module):
    """Like timm's DlaTree: takes a shortcut argument it does not use (it computes its own)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.project = nn.Conv2d(c, c, 1)
        self.leaf = Leaf(c)

    def forward(self, x, shortcut=None):
        return self.leaf(x, self.project(x))


class Top(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.mid = Mid(c)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        m = self.mid(x, x)
        return self.conv2(torch.relu(self.conv1(m))) + m


class DlaLike(nn.Module):
    def __init__(self, output: str) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.top = Top(16)
        self.output = output

    def forward(self, x):
        h = self.stem(x)
        t = self.top(h)
        if self.output == "list":
            return [h, t]
        if self.output == "tuple":
            return (h, t)
        if self.output == "dict":
            return {"h": h, "t": t}
        return t


# -- timm's twins: plain models and the attention models timm builds by hand ------------------------

#: (plain, timm's SE model, parameters of both): se_inject(plain) is exactly the SE model.
SE_PAIRS = [
    ("resnet18", "seresnet18", 11_779_624),
    ("resnet34", "seresnet34", 21_960_416),
    ("resnet50", "seresnet50", 28_088_024),
    ("resnet101", "seresnet101", 49_326_872),
    ("resnet152", "seresnet152", 66_821_848),
    ("resnext50_32x4d", "seresnext50_32x4d", 27_559_896),
]

ATTENTION_PAIRS = [  # plain, timm's attention model, attn, position, parameter counts plain -> attention
    ("resnet50d", "ecaresnet50d", "eca", "branch", 25_576_264, 25_576_350),
    ("resnet26t", "ecaresnet26t", "eca", "branch", 16_011_872, 16_011_916),
    ("resnet33ts", "seresnet33ts", "se", "mid", 19_676_256, 19_779_200),
    ("resnet33ts", "gcresnet33ts", "gca", "mid", 19_676_256, 19_880_698),
    ("resnet33ts", "eca_resnet33ts", "eca", "mid", 19_676_256, 19_676_302),
]
