"""Property-based tests: se_inject on randomly generated residual conv nets.

Hypothesis draws a *spec* (1-D, 2-D or 3-D convs, input size, a chain of items, se_inject options,
a torch seed) and the test builds the net from it, so every planted add is known in advance:

* residual adds in blocks (``nn.Module`` subclasses, one or two residual steps per block), in the
  root's own ``forward``, and nested (a block whose branch holds blocks), with identity, scaled
  (``x * 0.5``, ``x * param``), 1x1-conv + BN and avg-pool + 1x1-conv + BN shortcuts, strides 1
  and 2, basic / pre-activation / inverted (depthwise) branches, trailing Identity / Dropout, and
  every spelling of the add (``a + b``, ``b + a``, ``torch.add``, ``a.add(b)``, ``a += b``,
  ``a.add_(b)``);
* adds that must get no SE: bias / scalar adds (``x + 1.0``, ``x + param``), merges of two heavy
  paths, a linear branch plus identity (``bn(conv(x)) + x``) and RepVGG-like parallel linear
  convs (``bn(conv3x3(x)) + bn(conv1x1(x))``), in blocks and in the root's forward.

For every generated net the tests check: (1) exactly the planted residual adds get SE, with the
expected names, blocks, channels, shapes and shortcut labels, and the planted non-residual adds
are skipped with the expected reason; (2) the rewritten graphs are the original graphs plus SE
nodes: with SE made transparent, each rewritten block's graph equals a plain ``torch.fx`` trace of
the original block node for node, every add keeps its shortcut operand, SE takes the branch
output before trailing regularisers, and nothing on a shortcut path (fork to add) is an SE;
(3) the parameter delta is the sum over sites of ``2*C*h + h + C``, with ``h`` computed here, and
the state_dict gains exactly the SE keys (fc1 / fc2, and the identity-init gain buffer), the old
ones unchanged; (4) identity init reproduces the original output in eval mode (relative error
1e-5); (5) a backward (train or eval mode) reaches every SE parameter of every SE block whose
gate can get a gradient and that has a live (ReLU > 0) hidden unit. Also: the dry run
(``find_sites``) plans the same, and a second pass over the result adds nothing (every site is
then "has-attention").

CI runs the "ci" hypothesis profile from ``tests/conftest.py`` (few examples, derandomized). To
search for counterexamples, run many more examples by hand (2,000 examples, about 10 minutes on
one core; each run draws new ones unless given a seed)::

    python -m pytest -q tests/test_properties.py --hypothesis-profile=long
    python -m pytest -q tests/test_properties.py --hypothesis-profile=long --hypothesis-seed=123

A failure prints the shrunk spec and a ``@reproduce_failure`` blob. What the generated nets found
in se_inject is pinned by the regression tests at the end of this module.
"""

from __future__ import annotations

import collections
import operator
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import pytest
import torch
from hypothesis import event, example, given, settings
from hypothesis import strategies as st
from torch import fx, nn

import se_inject
from se_inject import GraphModuleRootWarning, NoResidualAddsWarning, RefusedModuleWarning, SEBlock
from se_inject.trace.ops import add_operands
from se_inject.layers import alive_point
from tests.helpers import assert_shortcuts_untouched, count_params, upstream


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The nets are tiny: intra-op threads only add overhead (several times slower on 2 busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- specs ----------------------------------------------------------------------------------------

SPELLINGS = ("plus", "reversed", "torch.add", "method", "iadd", "add_")
OUT_OF_PLACE = ("plus", "reversed", "torch.add", "method")
ACTS = ("relu", "relu_inplace", "silu", "gelu")


@dataclass(frozen=True)
class Res:
    """One residual step ``post(spell(branch(x), shortcut(x)))``.

    branch: "basic" (conv-bn-act-conv-bn), "preact" (bn-act-conv), "inverted" (1x1, depthwise,
    1x1, each with bn) or "nested" (a sequence of blocks, ``inner``). shortcut: "identity",
    "scaled" (``x * 0.5``), "param_scaled" (``x * gamma``), "proj" (1x1 conv + bn) or "pool_proj"
    (avg-pool + 1x1 conv + bn). tail: "none", "identity" or "dropout" after the branch.
    """

    cin: int
    cout: int
    stride: int
    branch: str
    mid: int
    kernels: tuple[int, int]
    act: str
    shortcut: str
    spelling: str
    tail: str
    post: str
    inner: tuple[tuple["Res", ...], ...] = ()


@dataclass(frozen=True)
class Item:
    """One item of the net's chain. kind: "steps" (residual steps), "bias", "merge", "linear",
    "repvgg". where: "module" (the adds are in the item's own forward) or "root" (in the root's)."""

    kind: str
    where: str
    cin: int
    cout: int
    stride: int
    steps: tuple[Res, ...] = ()
    variant: str = ""


@dataclass(frozen=True)
class Options:
    reduction: int
    rd_divisor: Optional[int]
    act_layer: str
    gate_layer: str
    fuse_residual: bool = True

    def hidden(self, channels: int) -> int:
        """The SE width, computed here independently of se_inject (timm's make_divisible with
        round_limit=0, or the paper's max(1, C // r))."""
        if self.rd_divisor is None:
            return max(1, channels // self.reduction)
        d = self.rd_divisor
        return min(channels, max(d, int(channels / self.reduction + d / 2) // d * d))

    def kwargs(self) -> dict[str, Any]:
        return {"reduction": self.reduction, "rd_divisor": self.rd_divisor, "act_layer": self.act_layer,
                "gate_layer": self.gate_layer, "fuse_residual": self.fuse_residual}


@dataclass(frozen=True)
class NetSpec:
    dims: int
    spatial: tuple[int, ...]
    in_ch: int
    width: int
    items: tuple[Item, ...]
    options: Options
    seed: int
    grad_mode: str

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (2, self.in_ch, *self.spatial)


def _down(spatial: tuple[int, ...], stride: int) -> tuple[int, ...]:
    """Spatial size after a stride-s conv with 'same' padding (k=3, p=1 or k=1, p=0)."""
    return tuple((s - 1) // stride + 1 for s in spatial)


# -- strategies -----------------------------------------------------------------------------------

widths = st.integers(2, 16)


@st.composite
def residual_steps(draw, cin: int, spatial: tuple[int, ...], *, depth: int = 0, may_stride: bool = True) -> Res:
    stride = draw(st.sampled_from((1, 1, 2) if may_stride else (1,)))
    branch = draw(st.sampled_from(("basic", "basic", "preact", "inverted") + (("nested",) if depth == 0 else ())))
    inner: tuple[tuple[Res, ...], ...] = ()
    if branch == "nested":
        # A block whose branch is a chain of 1-2 blocks; only the first may stride.
        blocks, c, size = [], cin, spatial
        for k in range(draw(st.integers(1, 2))):
            first = draw(residual_steps(c, size, depth=depth + 1, may_stride=(k == 0 and stride == 2)))
            size = _down(size, first.stride)
            steps = [first]
            if draw(st.booleans()):
                steps.append(draw(residual_steps(first.cout, size, depth=depth + 1, may_stride=False)))
            blocks.append(tuple(steps))
            c = steps[-1].cout
        inner = tuple(blocks)
        cout = c
        stride = max(s.stride for b in blocks for s in b)
    else:
        cout = draw(st.one_of(st.just(cin), widths))
    shortcuts = ["proj"]
    if stride == 1 and cin == cout:
        shortcuts += ["identity", "identity", "scaled", "param_scaled"]
    if stride == 2 and min(spatial) >= 2:  # a 2-wide pooling window must fit
        shortcuts += ["pool_proj"]
    # In-place adds write into the branch output: only where that is an op whose backward does
    # not need its output (a norm, conv or regulariser), as in real nets.
    spelling = draw(st.sampled_from(OUT_OF_PLACE if branch == "nested" else SPELLINGS))
    return Res(
        cin=cin, cout=cout, stride=stride, branch=branch,
        mid=draw(widths),
        kernels=(draw(st.sampled_from((1, 3))), draw(st.sampled_from((1, 3)))),
        act=draw(st.sampled_from(ACTS)),
        shortcut=draw(st.sampled_from(shortcuts)),
        spelling=spelling,
        tail=draw(st.sampled_from(("none", "none", "identity", "dropout"))),
        post=draw(st.sampled_from(("none", "relu", "relu_inplace"))),
        inner=inner,
    )


@st.composite
def items(draw, cin: int, spatial: tuple[int, ...]) -> Item:
    kind = draw(st.sampled_from(("steps",) * 4 + ("root_res",) * 2 + ("bias", "merge", "linear", "repvgg")))
    if kind in ("steps", "root_res"):
        first = draw(residual_steps(cin, spatial))
        steps = [first]
        if draw(st.integers(0, 3)) == 0:  # a second residual step in the same forward
            steps.append(draw(residual_steps(first.cout, _down(spatial, first.stride), depth=1)))
        return Item("steps", "root" if kind == "root_res" else "module", cin, steps[-1].cout,
                    max(s.stride for s in steps), tuple(steps))
    where = draw(st.sampled_from(("module", "root")))
    if kind == "bias":
        variant = draw(st.sampled_from(("const", "const_rev", "torch.add", "param", "param_rev")))
        return Item("bias", where, cin, cin, 1, variant=variant)
    if kind == "linear":  # bn(conv(x)) + x: a linear branch with an identity shortcut
        return Item("linear", where, cin, cin, 1, variant=draw(st.sampled_from(SPELLINGS)))
    cout, stride = draw(st.one_of(st.just(cin), widths)), draw(st.sampled_from((1, 2)))
    if kind == "merge":  # relu(bn(conv_a(x))) + relu(bn(conv_b(x)))
        return Item("merge", where, cin, cout, stride, variant=draw(st.sampled_from(OUT_OF_PLACE)))
    return Item("repvgg", where, cin, cout, stride, variant=draw(st.sampled_from(("kxk_first", "1x1_first"))))


@st.composite
def net_specs(draw, max_items: int = 5) -> NetSpec:
    dims = draw(st.sampled_from((1, 2, 3)))
    if dims == 1:
        spatial: tuple[int, ...] = (draw(st.integers(4, 16)),)
    elif dims == 2:
        spatial = (draw(st.integers(4, 10)), draw(st.integers(4, 10)))
    else:
        spatial = (draw(st.integers(2, 4)), draw(st.integers(3, 6)), draw(st.integers(3, 6)))
    width = draw(widths)
    chain, c, size = [], width, spatial
    for _ in range(draw(st.integers(1, max_items))):
        item = draw(items(c, size))
        chain.append(item)
        c = item.cout
        for stride in [r.stride for r in item.steps] or [item.stride]:
            size = _down(size, stride)
    options = Options(
        reduction=draw(st.sampled_from((16, 16, 8, 4, 2))),
        rd_divisor=draw(st.sampled_from((8, 8, 4, None))),
        act_layer=draw(st.sampled_from(("relu", "relu", "silu"))),
        gate_layer=draw(st.sampled_from(("sigmoid", "sigmoid", "hard_sigmoid"))),
        fuse_residual=draw(st.booleans()),
    )
    return NetSpec(dims, spatial, draw(st.integers(1, 4)), width, tuple(chain), options,
                   draw(st.integers(0, 2**31 - 1)), draw(st.sampled_from(("train", "eval"))))


# -- building nets from specs ---------------------------------------------------------------------

def _conv(dims: int):
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]


def _bn(dims: int):
    return {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]


def _pool(dims: int):
    return {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}[dims]


def _act(name: str) -> nn.Module:
    return {"relu": nn.ReLU(), "relu_inplace": nn.ReLU(inplace=True), "silu": nn.SiLU(),
            "gelu": nn.GELU()}[name]


def _tail(name: str) -> list[nn.Module]:
    return {"none": [], "identity": [nn.Identity()], "dropout": [nn.Dropout(0.1)]}[name]


def spell(spelling: str, out: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
    if spelling == "plus":
        return out + shortcut
    if spelling == "reversed":
        return shortcut + out
    if spelling == "torch.add":
        return torch.add(out, shortcut)
    if spelling == "method":
        return out.add(shortcut)
    if spelling == "iadd":
        out += shortcut
        return out
    if spelling == "add_":
        out.add_(shortcut)
        return out  # fx keeps reading the pre-add node here: se_inject must redirect it
    raise ValueError(spelling)


class Parts(nn.Module):
    """The modules of one residual step (no forward: called from a Steps' or the root's)."""

    def __init__(self, r: Res, dims: int) -> None:
        super().__init__()
        conv, bn = _conv(dims), _bn(dims)
        if r.branch == "basic":
            k1, k2 = r.kernels
            layers = [conv(r.cin, r.mid, k1, r.stride, k1 // 2, bias=False), bn(r.mid), _act(r.act),
                      conv(r.mid, r.cout, k2, 1, k2 // 2, bias=False), bn(r.cout)]
        elif r.branch == "preact":
            k = r.kernels[0]
            layers = [bn(r.cin), _act(r.act), conv(r.cin, r.cout, k, r.stride, k // 2)]
        elif r.branch == "inverted":
            layers = [conv(r.cin, r.mid, 1, bias=False), bn(r.mid), _act(r.act),
                      conv(r.mid, r.mid, 3, r.stride, 1, groups=r.mid, bias=False), bn(r.mid), _act(r.act),
                      conv(r.mid, r.cout, 1, bias=False), bn(r.cout)]
        else:
            layers = [Steps(block, dims) for block in r.inner]
        self.branch = nn.Sequential(*layers, *_tail(r.tail))
        if r.shortcut == "proj":
            self.shortcut = nn.Sequential(conv(r.cin, r.cout, 1, r.stride, bias=False), bn(r.cout))
        elif r.shortcut == "pool_proj":
            self.shortcut = nn.Sequential(_pool(dims)(2, 2, ceil_mode=True, count_include_pad=False),
                                          conv(r.cin, r.cout, 1, bias=False), bn(r.cout))
        elif r.shortcut == "param_scaled":
            self.gamma = nn.Parameter(torch.rand((1, r.cout) + (1,) * dims) + 0.5)
        if r.post != "none":
            self.post = _act(r.post)


def residual_step(p: Parts, r: Res, x: torch.Tensor) -> torch.Tensor:
    out = p.branch(x)
    if r.shortcut in ("proj", "pool_proj"):
        shortcut = p.shortcut(x)
    elif r.shortcut == "scaled":
        shortcut = x * 0.5
    elif r.shortcut == "param_scaled":
        shortcut = x * p.gamma
    else:
        shortcut = x
    out = spell(r.spelling, out, shortcut)
    return p.post(out) if r.post != "none" else out


class Steps(nn.Module):
    """A block: one or two residual steps in its own forward."""

    def __init__(self, steps: tuple[Res, ...], dims: int) -> None:
        super().__init__()
        self.specs = steps
        self.parts = nn.ModuleList(Parts(r, dims) for r in steps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for r, p in zip(self.specs, self.parts):
            x = residual_step(p, r, x)
        return x


class NonResidual(nn.Module):
    """An item whose add must get no SE."""

    def __init__(self, item: Item, dims: int) -> None:
        super().__init__()
        self.item = item
        conv, bn = _conv(dims), _bn(dims)
        if item.kind == "bias":
            self.bias = nn.Parameter(torch.randn((1, item.cin) + (1,) * dims))
        elif item.kind == "linear":
            self.conv, self.bn = conv(item.cin, item.cin, 3, 1, 1, bias=False), bn(item.cin)
        elif item.kind == "merge":
            self.conv_a, self.bn_a = conv(item.cin, item.cout, 3, item.stride, 1, bias=False), bn(item.cout)
            self.conv_b, self.bn_b = conv(item.cin, item.cout, 3, item.stride, 1, bias=False), bn(item.cout)
            self.relu = nn.ReLU()
        elif item.kind == "repvgg":
            self.conv_k, self.bn_k = conv(item.cin, item.cout, 3, item.stride, 1, bias=False), bn(item.cout)
            self.conv_1, self.bn_1 = conv(item.cin, item.cout, 1, item.stride, bias=False), bn(item.cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return non_residual(self, self.item, x)


def non_residual(m: NonResidual, item: Item, x: torch.Tensor) -> torch.Tensor:
    if item.kind == "bias":
        return {"const": lambda: x + 1.0, "const_rev": lambda: 1.0 + x, "torch.add": lambda: torch.add(x, 0.5),
                "param": lambda: x + m.bias, "param_rev": lambda: m.bias + x}[item.variant]()
    if item.kind == "linear":
        return spell(item.variant, m.bn(m.conv(x)), x)
    if item.kind == "merge":
        return spell(item.variant, m.relu(m.bn_a(m.conv_a(x))), m.relu(m.bn_b(m.conv_b(x))))
    a, b = m.bn_k(m.conv_k(x)), m.bn_1(m.conv_1(x))
    return a + b if item.variant == "kxk_first" else b + a


class Net(nn.Module):
    def __init__(self, spec: NetSpec) -> None:
        super().__init__()
        d = spec.dims
        self.spec = spec
        self.stem = nn.Sequential(_conv(d)(spec.in_ch, spec.width, 3, 1, 1), _bn(d)(spec.width), nn.ReLU())
        self.items = nn.ModuleList(Steps(it.steps, d) if it.kind == "steps" else NonResidual(it, d)
                                   for it in spec.items)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for item, m in zip(self.spec.items, self.items):
            if item.where == "module":
                x = m(x)
            elif item.kind == "steps":  # the residual adds are in the root's own forward
                for r, p in zip(item.steps, m.parts):
                    x = residual_step(p, r, x)
            else:
                x = non_residual(m, item, x)
        return x


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters (as helpers.randomize_norms, plus
    affine), so that eval outputs are not degenerate and identity-init errors would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


def build(spec: NetSpec) -> tuple[Net, torch.Tensor]:
    torch.manual_seed(spec.seed)
    model = randomize(Net(spec), spec.seed).eval()
    return model, torch.randn(spec.input_shape)


# -- what the spec says se_inject must find -------------------------------------------------------

@dataclass(frozen=True)
class ExpectedSite:
    name: str
    block: str
    channels: int
    shape: tuple[int, ...]
    shortcut: str


def _shortcut_label(r: Res, dims: int) -> str:
    return {
        "identity": "identity",
        "scaled": "mul",
        "param_scaled": "mul",
        "proj": f"Conv{dims}d > BatchNorm{dims}d",
        "pool_proj": f"AvgPool{dims}d > Conv{dims}d > BatchNorm{dims}d",
    }[r.shortcut]


def expected_sites(spec: NetSpec) -> list[ExpectedSite]:
    """The residual adds planted in ``spec``, in graph order, with the SE names se_inject gives."""
    sites: list[ExpectedSite] = []
    counters: dict[str, int] = collections.Counter()

    def name(block: str) -> str:
        i = counters[block]
        counters[block] += 1
        local = "se" if i == 0 else f"se_{i}"
        return f"{block}.{local}" if block else local

    def steps(block: str, prefix: str, chain: tuple[Res, ...], spatial: tuple[int, ...]) -> tuple[int, ...]:
        for j, r in enumerate(chain):
            out_spatial = _down(spatial, r.stride)
            if r.branch == "nested":
                inner_spatial = spatial
                for k, inner in enumerate(r.inner):
                    path = f"{prefix}parts.{j}.branch.{k}"
                    inner_spatial = steps(path, path + ".", inner, inner_spatial)
                assert inner_spatial == out_spatial
            sites.append(ExpectedSite(name(block), block, r.cout, (2, r.cout, *out_spatial),
                                      _shortcut_label(r, spec.dims)))
            spatial = out_spatial
        return spatial

    spatial = spec.spatial
    for i, item in enumerate(spec.items):
        if item.kind == "steps":
            block = f"items.{i}" if item.where == "module" else ""
            spatial = steps(block, f"items.{i}.", item.steps, spatial)
        else:
            spatial = _down(spatial, item.stride)
    return sites


SKIP_REASON = {"bias": {"scalar"}, "merge": {"heavy-paths"}, "linear": {"linear-branch"},
               "repvgg": {"linear-branch"}}


# -- graph checks ---------------------------------------------------------------------------------

class _LeafTracer(fx.Tracer):
    """Plain torch.fx tracing, keeping the given submodule paths as leaves."""

    def __init__(self, leaves: set[str]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.leaves or super().is_leaf_module(m, qualname)


def _freeze(a: Any, ids: dict[fx.Node, int], resolve) -> Any:
    if isinstance(a, fx.Node):
        return ("node", ids[resolve(a)])
    if isinstance(a, (tuple, list)):
        return ("seq", tuple(_freeze(x, ids, resolve) for x in a))
    if isinstance(a, dict):
        return ("dict", tuple(sorted((k, _freeze(v, ids, resolve)) for k, v in a.items())))
    return (type(a).__name__, repr(a))


def canonical_ids(graph: fx.Graph, table: dict, transparent: set[fx.Node] = frozenset()
                  ) -> tuple[dict[fx.Node, int], dict[fx.Node, tuple[int, int]]]:
    """Hash-consing of a graph's dataflow: equal ids mean equal computations (op, target, inputs).

    Nodes in ``transparent`` (SE calls) get the id of their input. ``x.add_(y)`` is normalised to
    what it does: later readers of ``x`` read the add's result. Returns the ids of the nodes and,
    for each add, the ids of its two operands (as read at the add).
    """
    ids: dict[fx.Node, int] = {}
    operands: dict[fx.Node, tuple[int, int]] = {}
    alias: dict[fx.Node, fx.Node] = {}

    def resolve(n: fx.Node) -> fx.Node:
        while n in alias:
            n = alias[n]
        return n

    placeholders = 0
    for n in graph.nodes:
        if n in transparent:
            (inp,) = n.all_input_nodes
            ids[n] = ids[resolve(inp)]
            continue
        if n.op == "placeholder":
            key: Any = ("placeholder", placeholders)
            placeholders += 1
        else:
            key = (n.op, n.target, _freeze(n.args, ids, resolve), _freeze(n.kwargs, ids, resolve))
        ids[n] = table.setdefault(key, len(table))
        pair = add_operands(n)
        if pair is not None and all(isinstance(a, fx.Node) for a in pair):
            operands[n] = (ids[resolve(pair[0])], ids[resolve(pair[1])])
        if n.op == "call_method" and n.target == "add_" and isinstance(n.args[0], fx.Node):
            alias[resolve(n.args[0])] = n
    return ids, operands


def _is_se(gm: fx.GraphModule, n: fx.Node) -> bool:
    return n.op == "call_module" and isinstance(gm.get_submodule(n.target), SEBlock)


def _walk_back_regularizers(gm: nn.Module, node: fx.Node) -> fx.Node:
    """From a branch operand back over trailing Identity / Dropout modules."""
    while node.op == "call_module" and isinstance(gm.get_submodule(node.target), (nn.Identity, nn.Dropout)):
        (node,) = node.all_input_nodes
    return node


def check_graphs(original: nn.Module, injected: nn.Module, plan: se_inject.SitePlan) -> None:
    """Property (2): each rewritten block is its original graph plus SE nodes on branches only."""
    blocks = sorted({s.block for s in plan.sites})
    for block in blocks:
        gm = injected.get_submodule(block) if block else injected
        assert isinstance(gm, fx.GraphModule), block
        inner = {p for p in blocks if p != block and (not block or p.startswith(block + "."))}
        leaves = {p[len(block) + 1:] if block else p for p in inner}
        source = original.get_submodule(block) if block else original
        for path in leaves:  # the rewritten blocks inside stand as call_module nodes in gm too
            assert isinstance(gm.get_submodule(path), fx.GraphModule), (block, path)
        reference = _LeafTracer(leaves).trace(source)

        se_nodes = [n for n in gm.graph.nodes if _is_se(gm, n)]
        local_sites = [s for s in plan.sites if s.block == block]
        assert sorted(n.target for n in se_nodes) == sorted(s.name.rsplit(".", 1)[-1] for s in local_sites)
        assert len({n.target for n in se_nodes}) == len(se_nodes), "an SE module called twice"

        table: dict = {}
        ref_ids, ref_operands = canonical_ids(reference, table)
        new_ids, new_operands = canonical_ids(gm.graph, table, transparent=set(se_nodes))
        (ref_out,) = [n for n in reference.nodes if n.op == "output"]
        (new_out,) = [n for n in gm.graph.nodes if n.op == "output"]
        # With SE transparent, the rewritten block computes exactly what the original does.
        assert new_ids[new_out] == ref_ids[ref_out], (
            f"{block or '<root>'}: graph changed beyond SE\n{gm.graph}\n{reference}")

        ref_adds = {ref_ids[n]: n for n in reference.nodes if add_operands(n) is not None}
        by_name = {s.name.rsplit(".", 1)[-1]: s for s in local_sites}
        for se_node in se_nodes:
            site = by_name[se_node.target]
            assert len(se_node.users) == 1, f"{site.name}: SE output read more than once"
            add = se_node
            while add_operands(add) is None:  # SE -> (trailing regularisers) -> add
                # After `out.add_(s)`, what read `out` still reads the regulariser's output.
                # Later adds may read it too (`out + 1.0`); the in-place add on it comes first.
                adds = [u for u in add.users if add_operands(u) is not None]
                in_place = [u for u in adds if u.args[0] is add and (
                    (u.op == "call_method" and u.target == "add_") or u.target is operator.iadd)]
                (add,) = in_place or adds or list(add.users)
            assert add.name == site.add, (add.name, site.add)
            a, b = add_operands(add)
            branch_i = 0 if se_node in upstream(a) else 1
            branch, shortcut = (a, b) if branch_i == 0 else (b, a)
            assert se_node not in upstream(shortcut), f"{site.name}: SE reaches the shortcut operand"
            # The same add exists in the original graph, reading the same shortcut operand and
            # (SE transparent) the same branch operand.
            ref_add = ref_adds[new_ids[add]]
            ref_ops = add_operands(ref_add)
            assert new_operands[add] == ref_operands[ref_add], f"{site.name}: add operands changed"
            # SE takes the branch output before its trailing regularisers.
            (tail,) = se_node.all_input_nodes
            ref_tail = _walk_back_regularizers(source, ref_ops[branch_i])
            ref_tail_id = ref_ids[ref_tail] if ref_tail is not ref_ops[branch_i] else ref_operands[ref_add][branch_i]
            assert new_ids[se_node] == ref_tail_id, f"{site.name}: SE is not on the branch's last op"
            # Nothing that only the shortcut reads (fork to add) is an SE; its ops are the label's.
            shortcut_only = upstream(shortcut) - upstream(tail)
            assert not any(_is_se(gm, n) for n in shortcut_only), f"{site.name}: SE on the shortcut path"
            ordered = [n for n in gm.graph.nodes if n in shortcut_only]
            labels = [type(gm.get_submodule(n.target)).__name__ if n.op == "call_module"
                      else str(getattr(n.target, "__name__", n.target)) for n in ordered if n.op != "get_attr"]
            assert (" > ".join(labels) or "identity") == site.shortcut, (site.name, labels, site.shortcut)
            if site.shortcut == "identity":
                assert shortcut in upstream(tail)  # the fork itself


def check_fused_graphs(original: nn.Module, injected: nn.Module, plan: se_inject.SitePlan) -> None:
    """Property (2) where SE blocks do their add: each such SE reads the branch's tail and the
    shortcut, stands for exactly one add of the original block, and no SE sits on a path only the
    shortcut takes."""
    assert_shortcuts_untouched(injected, plan)
    for block in sorted({s.block for s in plan.sites}):
        gm = injected.get_submodule(block) if block else injected
        source = original.get_submodule(block) if block else original
        inner = {p for p in {s.block for s in plan.sites} if p != block and (not block or p.startswith(block + "."))}
        reference = _LeafTracer({p[len(block) + 1:] if block else p for p in inner}).trace(source)
        fused = [n for n in gm.graph.nodes if _is_se(gm, n) and len(n.args) == 2]
        adds = lambda graph: sum(add_operands(n) is not None for n in graph.nodes)  # noqa: E731
        assert adds(gm.graph) + len(fused) == adds(reference), f"{block or '<root>'}: adds lost or gained"
        for n in fused:  # the branch's tail does not feed the shortcut, which is read unchanged
            tail, shortcut = n.args
            assert tail not in upstream(shortcut), f"{block or '<root>'}: {n.name} adds its branch to itself"


# -- the properties -------------------------------------------------------------------------------

def _inject(model: nn.Module, x: torch.Tensor, spec: NetSpec) -> tuple[se_inject.Injection, list]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = se_inject.inject(model, example_inputs=x, identity_init=True, **spec.options.kwargs())
    return result, [w.category for w in caught]


def _res(cin: int, cout: int, stride: int, branch: str, shortcut: str, spelling: str, *, mid: int = 8,
         kernels: tuple[int, int] = (3, 3), act: str = "relu", tail: str = "none", post: str = "relu",
         inner: tuple[tuple[Res, ...], ...] = ()) -> Res:
    return Res(cin, cout, stride, branch, mid, kernels, act, shortcut, spelling, tail, post, inner)


# Hand-written nets that CI always runs (before the drawn ones): together they hold every item
# kind, shortcut, spelling, branch and tail, in blocks and in the root's forward.
EXAMPLES = [
    NetSpec(2, (8, 8), 3, 8, (
        Item("steps", "module", 8, 16, 2, (_res(8, 16, 2, "basic", "pool_proj", "add_", act="relu_inplace"),)),
        Item("steps", "root", 16, 16, 1, (
            _res(16, 16, 1, "preact", "identity", "iadd", kernels=(3, 1), act="gelu", tail="identity", post="none"),
            _res(16, 16, 1, "basic", "scaled", "reversed", kernels=(1, 3), act="silu", tail="dropout"))),
        Item("steps", "module", 16, 16, 1, (_res(16, 16, 1, "nested", "identity", "plus", inner=(
            (_res(16, 16, 1, "basic", "identity", "torch.add"),),
            (_res(16, 16, 1, "inverted", "param_scaled", "method", mid=32, post="none"),
             _res(16, 16, 1, "basic", "identity", "plus", post="relu_inplace")))),)),
        Item("bias", "root", 16, 16, 1, variant="param"),
        Item("merge", "module", 16, 8, 2, variant="torch.add"),
        Item("linear", "root", 8, 8, 1, variant="add_"),
        Item("repvgg", "module", 8, 8, 1, variant="1x1_first"),
        Item("bias", "module", 8, 8, 1, variant="const_rev"),
    ), Options(16, 8, "relu", "sigmoid"), 1, "train"),
    NetSpec(3, (4, 6, 6), 2, 6, (
        Item("steps", "module", 6, 12, 2, (_res(6, 12, 2, "inverted", "proj", "method", mid=12, post="none"),)),
        Item("steps", "root", 12, 12, 1, (_res(12, 12, 1, "basic", "identity", "torch.add", mid=4, tail="dropout",
                                               post="relu_inplace"),)),
        Item("repvgg", "root", 12, 12, 1, variant="kxk_first"),
        Item("merge", "root", 12, 12, 1, variant="plus"),
        Item("bias", "module", 12, 12, 1, variant="param_rev"),
    ), Options(4, None, "silu", "hard_sigmoid", fuse_residual=False), 2, "eval"),
    NetSpec(1, (16,), 1, 4, (
        Item("steps", "module", 4, 8, 2, (_res(4, 4, 1, "basic", "identity", "plus", mid=4),
                                          _res(4, 8, 2, "preact", "proj", "add_", post="none"))),
        Item("bias", "module", 8, 8, 1, variant="torch.add"),
        Item("bias", "root", 8, 8, 1, variant="const"),
        Item("linear", "module", 8, 8, 1, variant="iadd"),
    ), Options(2, None, "relu", "sigmoid", fuse_residual=False), 3, "train"),
    # Found by the long run: `out.add_(shortcut)` behind a trailing Identity in the root's forward,
    # then `out + 1.0`, which reads the in-place add's result through the regulariser's output.
    NetSpec(1, (4,), 1, 2, (
        Item("steps", "root", 2, 2, 1, (_res(2, 2, 1, "basic", "proj", "add_", mid=2, kernels=(1, 1),
                                             tail="identity", post="none"),)),
        Item("bias", "module", 2, 2, 1, variant="const"),
    ), Options(16, 8, "relu", "sigmoid"), 0, "train"),
]


def _se_param_name(name: str) -> bool:
    parts = name.split(".")
    return any(p == "se" or (p.startswith("se_") and p[3:].isdigit()) for p in parts[:-2])


@pytest.mark.slow
@settings(deadline=None)
@given(spec=net_specs())
@example(spec=EXAMPLES[0])
@example(spec=EXAMPLES[1])
@example(spec=EXAMPLES[2])
@example(spec=EXAMPLES[3])
def test_generated_residual_nets(spec: NetSpec) -> None:
    model, x = build(spec)
    expected = expected_sites(spec)
    event(f"{spec.dims}-D")
    event(f"residual adds: {min(len(expected), 6)}{'+' if len(expected) > 6 else ''}")
    event(f"root-level residual: {any(s.block == '' for s in expected)}")
    event(f"nested: {any(r.branch == 'nested' for it in spec.items for r in it.steps)}")
    for kind in sorted({it.kind for it in spec.items if it.kind != 'steps'}):
        event(f"non-residual: {kind}")
    result, caught = _inject(model, x, spec)
    plan, new = result.plan, result.model

    # (1) exactly the planted residual adds, and the planted non-residual adds are skipped.
    assert RefusedModuleWarning not in caught
    got = [ExpectedSite(s.name, s.block, s.channels, s.shape, s.shortcut) for s in plan.sites]
    assert got == expected
    for s in plan.sites:
        assert s.hidden == spec.options.hidden(s.channels)
    # Skips come in graph order: the root's own ones in the order of the root-level items.
    module_skips = {f"items.{i}": it.kind for i, it in enumerate(spec.items)
                    if it.kind != "steps" and it.where == "module"}
    root_kinds = [it.kind for it in spec.items if it.kind != "steps" and it.where == "root"]
    root_skips = [s for s in plan.skipped if s.name.startswith("<root>:")]
    others = [s for s in plan.skipped if not s.name.startswith("<root>:")]
    assert len(root_skips) == len(root_kinds) and len(others) == len(module_skips), plan.skipped
    for skip, kind in zip(root_skips, root_kinds):
        assert skip.reason in SKIP_REASON[kind], (skip, kind)
    for skip in others:
        block, _, _ = skip.name.partition(":")
        assert skip.reason in SKIP_REASON[module_skips.pop(block)], skip
    root_site = any(s.block == "" for s in plan.sites)
    assert (GraphModuleRootWarning in caught) == root_site
    assert (NoResidualAddsWarning in caught) == (not expected)
    assert isinstance(new, fx.GraphModule) if root_site else type(new) is Net
    assert new is not model
    # The dry run plans the same, and a second pass adds nothing: each site is now "has-attention".
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoResidualAddsWarning)
        warnings.simplefilter("ignore", GraphModuleRootWarning)
        dry = se_inject.find_sites(model, example_inputs=x, identity_init=True, **spec.options.kwargs())
        again = se_inject.inject(new, example_inputs=x, identity_init=True, **spec.options.kwargs()).plan
    assert (dry.sites, dry.skipped) == (plan.sites, plan.skipped)
    assert not again.sites
    assert collections.Counter(s.reason for s in again.skipped) == collections.Counter(
        [s.reason for s in plan.skipped] + ["has-attention"] * len(plan.sites))

    # (2) the graphs: original + SE, on branches only (SE doing its add: see check_fused_graphs).
    if spec.options.fuse_residual:
        check_fused_graphs(model, new, plan)
    else:
        check_graphs(model, new, plan)

    # (3) parameters: the delta is the SE blocks', and the state_dict gains exactly their keys.
    assert count_params(new) - count_params(model) == sum(
        2 * s.channels * s.hidden + s.hidden + s.channels for s in plan.sites)
    assert sum(s.params for s in plan.sites) == count_params(new) - count_params(model)
    before, after = model.state_dict(), new.state_dict()
    se_keys = {f"{s.name}.{k}" for s in plan.sites for k in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")}
    assert se_keys <= set(after) - set(before)
    # Besides the fc keys, only the identity-init gain buffer of each SE block may be new.
    assert set(after) - set(before) - se_keys <= {f"{s.name}.gain" for s in plan.sites}
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    se_modules = {n: m for n, m in new.named_modules() if isinstance(m, SEBlock)}
    assert sorted(se_modules) == sorted(s.name for s in plan.sites)
    for s in plan.sites:
        se = se_modules[s.name]
        assert se.fc1.weight.shape == (s.hidden, s.channels) + (1,) * spec.dims
        assert se.spatial_dims == spec.dims

    # (4) identity init reproduces the original, in eval mode, on the example and a fresh input.
    new.eval()
    for inp in (x, torch.randn(spec.input_shape)):
        with torch.no_grad():
            expected_out, actual = model(inp), new(inp)
        assert actual.shape == expected_out.shape
        scale = float(expected_out.abs().max()) + 1e-12
        err = float((actual - expected_out).abs().max())
        assert err <= 1e-5 * scale, f"identity init changed the output: max error {err:.3g}, max |out| {scale:.3g}"

    # (5) a backward reaches every SE parameter.
    new.train(spec.grad_mode == "train")
    pre_acts: dict[str, torch.Tensor] = {}
    gate_grads: dict[str, torch.Tensor] = {}

    def record_gate_grad(name: str):
        """What reaches the gate: sum over space of (SE input * gradient of the product x * g);
        an SE block that does its add and a ReLU passes the gradient on where its output is > 0."""
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0].detach().clone()
            live = (output > 0).detach() if getattr(module, "out_act", "none") == "relu" else 1
            output.register_hook(lambda g: gate_grads.__setitem__(
                name, (x * g * live).sum(dim=tuple(range(2, x.dim())))))
        return hook

    handles = []
    for n, se in se_modules.items():
        handles.append(se.act.register_forward_pre_hook(
            lambda m, args, n=n: pre_acts.__setitem__(n, args[0].detach().clone())))
        handles.append(se.register_forward_hook(record_gate_grad(n)))
    try:
        out = new(torch.randn(spec.input_shape))
    finally:
        for h in handles:
            h.remove()
    (out * torch.randn_like(out)).sum().backward()
    se_params = {n for n, _ in new.named_parameters() if _se_param_name(n)}
    assert se_params == {f"{n}.{k}" for n in se_modules for k in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")}
    for name, se in se_modules.items():
        grads = {k: p.grad for k, p in se.named_parameters()}
        assert all(g is not None for g in grads.values()), name
        if not gate_grads[name].any():
            # No gradient can reach the gate: nothing downstream depends on this SE for this
            # input, or the branch output is all zero (a dead ReLU ends the branch).
            event("no gradient reaches the SE gate")
            continue
        assert grads["fc2.bias"].abs().sum() > 0, f"{name}.fc2.bias got no gradient"
        # A ReLU unit that is negative for every sample passes no gradient (a dead unit, not
        # se_inject's doing); with every hidden unit dead, only fc2.bias learns this step.
        if spec.options.act_layer == "relu" and not (pre_acts[name] > 0).any():
            event("SE with no live hidden unit")
            continue
        for k, g in grads.items():
            if k == "fc2.weight" and se.rd_channels == 1 and alive_point(type(se.act)) == 0.0:
                # SEBlock.init_identity_'s stated exception: the only hidden unit is the alive unit at
                # act(0) = 0 (SiLU), so fc2.weight's first gradient is exactly zero; it comes on step 2.
                event("SE of width 1 with an alive point of 0")
                assert not g.any(), f"{name}.{k}"
                continue
            assert g.abs().sum() > 0, f"{name}.{k} got no gradient ({spec.grad_mode} mode)"


# -- what the generated nets found ----------------------------------------------------------------

class _Basic(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        return self.bn(self.conv(torch.relu(x))) + x


def test_identity_init_with_hidden_width_one_gives_fc1_a_gradient():
    # Found by the generated nets: identity init used to zero fc2 when the hidden width is 1
    # (rd_divisor=None, C < 2r), leaving fc1 without gradient.
    model = nn.Sequential(nn.Conv2d(3, 8, 1), _Basic(8))
    x = torch.randn(2, 3, 8, 8)
    result = se_inject.inject(model, example_inputs=x, identity_init=True, rd_divisor=None, reduction=16)
    assert result.plan.sites[0].hidden == 1
    out = result.model(x)
    (out * torch.randn_like(out)).sum().backward()
    se = result.model[1].se
    assert se.fc1.weight.grad.abs().sum() > 0 and se.fc1.bias.grad.abs().sum() > 0


class _ParallelLinear(nn.Module):
    def __init__(self, c: int, kxk_first: bool) -> None:
        super().__init__()
        self.conv_k, self.bn_k = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv_1, self.bn_1 = nn.Conv2d(c, c, 1), nn.BatchNorm2d(c)
        self.kxk_first = kxk_first

    def forward(self, x):
        a, b = self.bn_k(self.conv_k(x)), self.bn_1(self.conv_1(x))
        return a + b if self.kxk_first else b + a


def test_parallel_linear_convs_reason_does_not_depend_on_operand_order():
    # Found by the generated nets: bn(conv3x3(x)) + bn(conv1x1(x)) used to be skipped as
    # "heavy-paths", the same add written the other way round as "linear-branch".
    reasons = []
    for kxk_first in (True, False):
        model = nn.Sequential(nn.Conv2d(3, 8, 1), _ParallelLinear(8, kxk_first))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NoResidualAddsWarning)
            plan = se_inject.find_sites(model, example_inputs=torch.randn(2, 3, 8, 8))
        reasons.append([s.reason for s in plan.skipped])
    assert reasons == [["linear-branch"], ["linear-branch"]]


class _InPlaceDropPath(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.branch = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                                    nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.Dropout(0.1))

    def forward(self, x):
        out = self.branch(x)
        out.add_(x)
        return out


def test_in_place_add_keeps_trailing_regularizer_after_se():
    # Found by the generated nets: with `out.add_(x); return out` fx reads the branch output
    # twice, and SE used to go after the trailing dropout instead of before it.
    model = nn.Sequential(nn.Conv2d(3, 8, 1), _InPlaceDropPath(8))
    new = se_inject.apply(model, example_inputs=torch.randn(2, 3, 8, 8))
    (se,) = [n for n in new[1].graph.nodes if n.op == "call_module" and n.target == "se"]
    assert se.args[0].target == "branch.4"  # the last BatchNorm, as with `out = out + x`
