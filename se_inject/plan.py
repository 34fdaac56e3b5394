"""What a dry run finds: the sites that get SE, the adds that do not (and why), what fx could not
trace, and their JSON form."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from torch import nn

from .options import SEOptions, attention_label

__all__ = ["SKIP_REASONS", "Site", "Skip", "Untraceable", "SitePlan", "Injection"]

#: Why an add gets no SE block: reason code -> explanation (shown by the dry run and the report).
SKIP_REASONS: dict[str, str] = {
    "scalar": "an operand is a constant: a scalar, parameter or buffer (bias, embedding, eps)",
    "broadcast": "operand shapes differ (broadcast add: bias, position embedding, eps)",
    "no-spatial-dims": "fewer than 3 dims, so nothing to squeeze",
    "batch-dim": "dim 0 is not the batch size (attention-internal add)",
    "not-float": "operands are not floating point",
    "no-common-input": "the operands share no input (not a residual connection)",
    "heavy-paths": "no operand is a light shortcut (merge of two heavy paths, e.g. HRNet fuse)",
    "split-slice": "the shortcut is a slice of a split tensor (hierarchical add, e.g. Res2Net)",
    "no-conv-branch": "the branch has no conv or linear layer (e.g. GRN, pooling mixer)",
    "linear-branch": "the branch has no nonlinearity (parallel linear convs, e.g. RepVGG)",
    "channels-last": "channels are not at dim 1 (channels-last layout: tokens, NHWC)",
    "channel-dim-unknown": "the branch's channel dim could not be proven to be dim 1",
    "has-attention": "the branch already has channel attention",
    "filtered": "left out by include / exclude / min_channels",
    "shared-module": "the block is called more than once (shared weights)",
    "untraceable-block": "the block holding the add cannot be traced on its own",
    "train-eval-differ": "the block traces differently in train and eval mode",
    "unverified": "the traced block does not reproduce the module's output",
    "no-mid-point": "position='mid': no k>1 conv on the branch followed by norm / activation and a 1x1 conv",
    "in-place-write": "position='pre' / 'identity': an in-place op would then write or read another tensor than "
                      "the block's (e.g. a pre-activation ReLU(inplace=True) that is not the branch's first op)",
}


@dataclass(frozen=True)
class Site:
    """A residual add that receives an SE block (or the attention ``attn`` names).

    Attributes:
        name: module path of the SE block (``"layer1.0.se"``); its state_dict keys start with it.
        block: module path of the block it goes into (``"layer1.0"``; ``""`` for the root).
        channels: channels C the module takes (at the add, for the default position);
            ``hidden``: the excitation width (None where the attention has none, e.g. ECA).
        shape: shape of the tensor the module takes, for the example input (N, C, *spatial).
        shortcut: ``"identity"`` or the ops on the shortcut path (``"Conv2d > BatchNorm2d"``).
        add: name of the add node in the traced block.
        attn: the attention (``"se"``, a timm name, or a factory's name); ``position``: where in
            the block (see :mod:`se_inject.sites.placement`); ``where``: what the module reads and what
            reads it, in the block (``"bn3 -> add"``).
        param_count: parameters of the inserted module (None: the SE formula).
    """

    name: str
    block: str
    channels: int
    hidden: Optional[int]
    shape: tuple[int, ...]
    shortcut: str
    add: str
    attn: str = "se"
    position: str = "branch"
    where: str = ""
    param_count: Optional[int] = None

    @property
    def params(self) -> int:
        """Parameters of the inserted module (SE: ``2*C*hidden + hidden + C``)."""
        if self.param_count is not None:
            return self.param_count
        return 2 * self.channels * (self.hidden or 0) + (self.hidden or 0) + self.channels

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "block": self.block, "channels": self.channels, "hidden": self.hidden,
                "feature_map": list(self.shape[2:]), "shortcut": self.shortcut, "params": self.params,
                "attn": self.attn, "position": self.position, "where": self.where}


@dataclass(frozen=True)
class Skip:
    """An add that gets no SE block.

    Attributes:
        name: ``"<module path>:<add node>"`` of the add (``"<root>"`` for the root module).
        reason: a key of :data:`SKIP_REASONS`.
        detail: what was found, in words.
    """

    name: str
    reason: str
    detail: str

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "reason": self.reason, "detail": self.detail}


@dataclass(frozen=True)
class Untraceable:
    """A module fx could not trace whole (its children were tried instead), with the reason."""

    path: str
    error: str

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path or "<root>", "error": self.error}


@dataclass
class SitePlan:
    """The dry run's answer: where SE goes, which adds were skipped and why, what fx could not trace.

    Attributes:
        model: class name of the model.
        input_shapes: shapes of the example inputs used.
        options: the options the plan was made with.
        sites: residual adds that receive SE, in graph order.
        skipped: adds that do not, each with a reason.
        untraceable: modules fx could not trace whole (their children were analysed instead).
    """

    model: str
    input_shapes: list[tuple[int, ...]]
    options: SEOptions
    sites: list[Site] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    untraceable: list[Untraceable] = field(default_factory=list)

    def skipped_by_reason(self) -> dict[str, list[Skip]]:
        """Skipped adds grouped by reason code, in order of first appearance."""
        groups: dict[str, list[Skip]] = {}
        for s in self.skipped:
            groups.setdefault(s.reason, []).append(s)
        return groups

    def skip_summary(self) -> str:
        """One line: how many adds were skipped for each reason (``"has-attention x8, ..."``)."""
        return ", ".join(f"{r} x{len(s)}" for r, s in self.skipped_by_reason().items()) or "no adds at all"

    def to_dict(self, name: str = "") -> dict[str, Any]:
        """The JSON form of the plan (``name`` defaults to the model's class name)."""
        return {
            "model": name or self.model,
            "input_shape": list(self.input_shapes[0]) if self.input_shapes else [],
            "reduction": self.options.reduction if self.options.given("reduction") else None,
            "attn": attention_label(self.options.attn),
            "position": self.options.position,
            "sites": [s.to_dict() for s in self.sites],
            "skipped": [s.to_dict() for s in self.skipped],
            "untraceable": [u.to_dict() for u in self.untraceable],
        }


@dataclass
class Injection:
    """What :func:`se_inject.inject` returns: the new model and the plan it followed."""

    model: nn.Module
    plan: SitePlan
