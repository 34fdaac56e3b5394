"""Coverage sweep: se_inject over one model of every timm family, every torchvision model, and the
Hugging Face transformers ``*ForImageClassification`` models that build from a default config.

For each model (random weights, a small input): trace and find the sites, apply SE with
``identity_init=True``, check the output equals the original's, and optionally ``torch.compile``
the result. Every outcome is classified:

* ``handled``: SE inserted, output verified equal to the original's;
* ``no-residual``: no residual add can take SE (the skip reasons say why: tokens, no adds, ...);
* ``refused``: residual adds exist but verification refused their blocks;
* ``fx-limit``: torch.fx cannot trace the model (or any part holding an add);
* ``input``: the model did not run on the sweep's input (a limit of the sweep, not of se_inject);
* ``bug``: anything else, in particular an output that differs after identity-init SE (a silently
  wrong model). The target is zero.

    python benchmarks/coverage.py                      # timm families + torchvision + transformers
    python benchmarks/coverage.py --hf                 # the transformers models only
    python benchmarks/coverage.py --subset ci          # the CI subset
    python benchmarks/coverage.py --families resnet convnext --compile
    python benchmarks/coverage.py --attn eca       # another attention (identity init, verified the same way)
    python benchmarks/coverage.py --position mid   # another placement

Results: ``benchmarks/results/coverage.md`` and ``coverage.json`` (the transformers group in its
own table and under ``"hf"``); ``--hf`` writes ``coverage-hf.md`` and ``.json``. transformers
models are built from ``AutoConfig.for_model(model_type)`` with random weights, on a 64 px input
where the model takes one, else at the config's ``image_size``, a fresh model for each size. With
``--attn`` / ``--position``, ``coverage-<attn>-<position>.md`` / ``.json`` (the defaults left out of
the name: ``coverage-eca``), timm and torchvision only unless ``--hf`` is given
(``coverage-hf-eca``).
"""

from __future__ import annotations

import argparse
import re
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import timm
import torch
import torchvision
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

import se_inject

try:
    from .common import RESULTS, table, write_results
except ImportError:  # run as a script: python benchmarks/coverage.py
    from common import RESULTS, table, write_results  # type: ignore[no-redef]

# A small, representative model for families where the name heuristic would pick a huge or odd one.
DEFAULT_MODEL = {
    "beit": "beit_base_patch16_224", "byoanet": "botnet26t_256", "byobnet": "resnet32ts",
    "cait": "cait_xxs24_224", "coat": "coat_lite_tiny", "convit": "convit_tiny",
    "convmixer": "convmixer_768_32", "convnext": "convnext_atto", "crossvit": "crossvit_tiny_240",
    "cspnet": "cspresnet50", "davit": "davit_tiny", "deit": "deit_tiny_patch16_224",
    "densenet": "densenet121", "dla": "dla34", "dpn": "dpn68", "edgenext": "edgenext_xx_small",
    "efficientformer": "efficientformer_l1", "efficientformer_v2": "efficientformerv2_s0",
    "efficientnet": "efficientnet_b0", "eva": "eva02_tiny_patch14_224", "fastvit": "fastvit_t8",
    "focalnet": "focalnet_tiny_srf", "gcvit": "gcvit_xxtiny", "ghostnet": "ghostnet_100",
    "hardcorenas": "hardcorenas_a", "hgnet": "hgnet_tiny", "hiera": "hiera_tiny_224",
    "hrnet": "hrnet_w18_small", "inception_next": "inception_next_atto", "levit": "levit_128s",
    "mambaout": "mambaout_femto", "maxxvit": "maxvit_tiny_tf_224", "metaformer": "poolformer_s12",
    "mlp_mixer": "mixer_s16_224", "mobilenetv3": "mobilenetv3_small_100", "mobilevit": "mobilevit_xxs",
    "mvitv2": "mvitv2_tiny", "nest": "nest_tiny", "nextvit": "nextvit_small", "nfnet": "nf_resnet50",
    "pit": "pit_ti_224", "pvt_v2": "pvt_v2_b0", "regnet": "regnetx_002", "repghost": "repghostnet_050",
    "repvit": "repvit_m1", "res2net": "res2net50_26w_4s", "resnest": "resnest14d", "resnet": "resnet50",
    "resnetv2": "resnetv2_50", "rexnet": "rexnet_100", "selecsls": "selecsls42b", "senet": "legacy_seresnet18",
    "sequencer": "sequencer2d_s", "sknet": "skresnet18", "swin_transformer": "swin_tiny_patch4_window7_224",
    "swin_transformer_v2": "swinv2_tiny_window8_256", "swin_transformer_v2_cr": "swinv2_cr_tiny_224",
    "tiny_vit": "tiny_vit_5m_224", "tnt": "tnt_s_patch16_224", "tresnet": "tresnet_m", "twins": "twins_svt_small",
    "vgg": "vgg11", "visformer": "visformer_tiny", "vision_transformer": "vit_tiny_patch16_224",
    "vision_transformer_hybrid": "vit_tiny_r_s16_p8_224", "vision_transformer_relpos": "vit_relpos_small_patch16_224",
    "vision_transformer_sam": "samvit_base_patch16_224", "volo": "volo_d1_224", "vovnet": "ese_vovnet19b_dw",
    "xception_aligned": "xception41", "xcit": "xcit_nano_12_p16_224", "starnet": "starnet_s1",
    "swiftformer": "swiftformer_xs", "efficientvit_mit": "efficientvit_b0", "efficientvit_msra": "efficientvit_m0",
    "lowformer": "lowformer_b0", "shvit": "shvit_s1", "rdnet": "rdnet_tiny", "fasternet": "fasternet_t0",
    "iformer": "iformer_t", "cspnext": "cspnext_s", "mobilenetv5": "mobilenetv5_300m",
    "hieradet_sam2": "hieradet_small", "vitamin": "vitamin_small_224", "csatv2": "csatv2",
    "lcnetv2": "lcnetv2_small", "cpubone": "cpubone_b0_bfrobust", "efficientvim": "efficientvim_m1",
}
_SMALL = re.compile(r"(atto|femto|pico|nano|tiny|xxs|xs|small|mini|_s\b|_t\b|b0|18|_s1|_m0)")

# About 15 families of every kind: plain and bottleneck residuals, inverted residuals, NHWC mixers,
# HRNet fusions, Res2Net splits, a no-trace leaf (NFNet), existing attention, tokens, no residual.
CI_FAMILIES = ["resnet", "convnext", "efficientnet", "mobilenetv3", "regnet", "res2net", "hrnet", "nfnet",
               "sknet", "mambaout", "vision_transformer", "densenet", "dla", "ghostnet", "resnetv2"]

TORCHVISION = {
    "classification": ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "mobilenet_v2",
                       "mobilenet_v3_small", "efficientnet_b0", "efficientnet_v2_s", "convnext_tiny",
                       "regnet_x_400mf", "regnet_y_400mf", "mnasnet0_5", "shufflenet_v2_x0_5",
                       "squeezenet1_0", "densenet121", "googlenet", "inception_v3", "alexnet", "vgg11",
                       "vit_b_16", "swin_t", "swin_v2_t", "maxvit_t"],
    "video": ["r3d_18", "mc3_18", "r2plus1d_18", "s3d", "mvit_v1_b", "swin3d_t"],
}


# transformers model types the sweep does not build, and why.
HF_SKIP = {
    "dinat": "needs the natten library",
    "imagegpt": "a pixel-token model: takes input_ids, not images",
    "siglip2": "takes pre-patchified pixel values with a patch mask",
    "perceiver": "default configs do not build (qk_channels not divisible by num_heads) or have 270M parameters",
    "shieldgemma2": "a Gemma-3 multimodal language model (billions of parameters)",
}
# A subset that runs in CI in well under a minute: bottleneck residuals behind an untraceable
# embedding, ConvNeXt behind decorated forwards, inverted residuals behind opaque TF-padding convs,
# blocks that return tuples (PoolFormer), no adds at all.
HF_CI = ["resnet", "convnext", "mobilenet_v2", "poolformer", "mobilenet_v1"]


@dataclass
class Outcome:
    """What happened to one model."""

    family: str
    model: str
    input_shape: list[int]
    status: str = "bug"
    traced: str = "no"  # yes: the whole model; partial: some submodules; no
    sites: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    untraceable: list[str] = field(default_factory=list)
    refused: int = 0
    max_rel_diff: Optional[float] = None
    compiled: Optional[bool] = None
    seconds: float = 0.0
    message: str = ""


def pick_model(family: str) -> str:
    """The model a sweep uses for a timm family (module)."""
    models = timm.list_models(module=family)
    if DEFAULT_MODEL.get(family) in models:
        return DEFAULT_MODEL[family]
    small = [m for m in models if _SMALL.search(m)]
    return min(small or models, key=lambda m: (len(m), m))


def _timm_factory(name: str, size: int) -> tuple[Callable[[], torch.nn.Module], tuple[int, ...]]:
    shape = _timm_default_shape(name)
    fixed = bool(getattr(timm.get_pretrained_cfg(name), "fixed_input_size", False))
    return (lambda: timm.create_model(name, pretrained=False)), shape if fixed else (1, shape[1], size, size)


def _timm_default_shape(name: str) -> tuple[int, ...]:
    cfg = timm.get_pretrained_cfg(name)
    return (1, *(tuple(getattr(cfg, "input_size", None) or (3, 224, 224)) if cfg else (3, 224, 224)))


def _torchvision_factory(kind: str, name: str, size: int) -> tuple[Callable[[], torch.nn.Module], tuple[int, ...]]:
    if kind == "video":
        builder = getattr(torchvision.models.video, name)
        shape = {"mvit_v1_b": (1, 3, 16, 224, 224), "s3d": (1, 3, 16, 224, 224),
                 "swin3d_t": (1, 3, 8, 112, 112)}.get(name, (1, 3, 8, size, size))
        return (lambda: builder()), shape
    builder = getattr(torchvision.models, name)
    fixed = {"vit_b_16": 224, "maxvit_t": 224, "inception_v3": 299, "googlenet": 224, "alexnet": 224}
    side = fixed.get(name, size)
    return (lambda: builder(**({"aux_logits": False, "init_weights": True} if name in ("inception_v3", "googlenet") else {}))), (1, 3, side, side)


def run_one(family: str, model_name: str, factory: Callable[[], torch.nn.Module], shape: tuple[int, ...],
            *, compile_model: bool = False, options: Optional[dict[str, Any]] = None) -> Outcome:
    """Apply SE (or ``options``' attention and position) to one model and classify what happened."""
    out = Outcome(family, model_name, list(shape))
    start = time.perf_counter()
    try:
        torch.manual_seed(0)
        model = factory().eval()
        x = torch.randn(shape)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = se_inject.inject(model, identity_init=True, example_inputs=x, **(options or {}))
        plan = result.plan
        out.sites = len(plan.sites)
        out.skipped = {r: len(s) for r, s in plan.skipped_by_reason().items()}
        out.untraceable = [u.path or "<root>" for u in plan.untraceable]
        out.traced = "partial" if "<root>" in out.untraceable else "yes"
        out.refused = out.skipped.get("unverified", 0)
        refused_msgs = [str(w.message) for w in caught if issubclass(w.category, se_inject.RefusedModuleWarning)]
        if not plan.sites:
            out.status = "refused" if refused_msgs else "no-residual"
            out.message = "; ".join(refused_msgs)[:300]
            return out
        injected = result.model.eval()
        with torch.no_grad():
            before, after = model(x), injected(x)
        before_t, after_t = _first_tensor(before), _first_tensor(after)
        scale = float(before_t.abs().max()) or 1.0
        out.max_rel_diff = float((before_t - after_t).abs().max()) / scale
        if before_t.shape != after_t.shape or out.max_rel_diff > 1e-4:
            out.status, out.message = "bug", f"identity-init output differs (max rel diff {out.max_rel_diff:.2e})"
            return out
        out.status = "handled"
        out.message = "; ".join(refused_msgs)[:300]
        if family == "transformers":
            problem = _hidden_states_problem(model, injected, x)
            if problem:
                out.status, out.message = "bug", problem
                return out
        if compile_model:
            torch._dynamo.reset()
            try:
                with torch.no_grad():
                    compiled = _first_tensor(torch.compile(injected)(x))
                out.compiled = bool(torch.allclose(compiled, after_t, rtol=1e-3, atol=1e-3 * scale))
            except Exception as e:  # compile failures are torch's to report, not ours
                out.compiled = False
                out.message = (out.message + f"; compile: {type(e).__name__}: {str(e).splitlines()[0][:150]}").strip("; ")
    except se_inject.TraceError as e:
        out.status, out.message = "fx-limit", str(e)[:300]
    except se_inject.ExampleInputError as e:
        out.status, out.message = "input", str(e)[:300]
    except se_inject.SEInjectError as e:
        out.status, out.message = "refused", str(e)[:300]
    except Exception as e:
        out.status = "bug"
        out.message = f"{type(e).__name__}: {e}".splitlines()[0][:200] + " | " + traceback.format_exc().splitlines()[-3][:150]
    finally:
        out.seconds = round(time.perf_counter() - start, 2)
    return out


def _hidden_states_problem(model: torch.nn.Module, injected: torch.nn.Module, x: torch.Tensor) -> str:
    """A transformers model must still return all its hidden states after SE ('' when it does)."""
    try:
        with torch.no_grad():
            before = model(x, output_hidden_states=True).hidden_states
    except Exception:  # the model has no such option
        return ""
    with torch.no_grad():
        after = injected(x, output_hidden_states=True).hidden_states
    if before is not None and (after is None or len(after) != len(before)):
        return f"output_hidden_states gives {len(after or ())} states instead of {len(before)}"
    return ""


def _hf_factory(model_type: str, class_name: str) -> tuple[Callable[[], torch.nn.Module], tuple[int, ...],
                                                             Optional[tuple[int, ...]]]:
    """A transformers model from its default config, its 64 px input and the config's own size."""
    import transformers

    config = transformers.AutoConfig.for_model(model_type)
    cls = getattr(transformers, class_name)
    channels = getattr(config, "num_channels", None) or 3
    size = getattr(config, "image_size", None) or getattr(getattr(config, "vision_config", None), "image_size", None)
    size = size[0] if isinstance(size, (list, tuple)) else size
    full = (1, channels, int(size), int(size)) if size and size != 64 else None
    return (lambda: cls(config)), (1, channels, 64, 64), full


def hf_jobs(model_types: Optional[list[str]] = None) -> list[tuple[str, str, Any, Any, Any]]:
    """(family, class name, factory or skip reason, input shape, fallback shape) per model type."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES as names

    out = []
    for model_type, classes in names.items():
        if model_types is not None and model_type not in model_types:
            continue
        class_name = classes[0] if isinstance(classes, (list, tuple)) else classes
        if model_type in HF_SKIP:
            out.append(("transformers", class_name, HF_SKIP[model_type], None, None))
            continue
        factory, shape, full = _hf_factory(model_type, class_name)
        out.append(("transformers", class_name, factory, shape, full))
    return out


def _first_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return _first_tensor(value[0])
    if isinstance(value, dict):
        return _first_tensor(next(iter(value.values())))
    raise TypeError(f"model output of type {type(value).__name__}")


def jobs(families: Optional[list[str]], size: int, include_torchvision: bool) -> list[tuple[str, str, Callable, tuple]]:
    chosen = families if families is not None else timm.list_modules()
    out = []
    for family in chosen:
        name = pick_model(family)
        factory, shape = _timm_factory(name, size)
        out.append((family, name, factory, shape))
    if include_torchvision:
        for kind, names in TORCHVISION.items():
            for name in names:
                factory, shape = _torchvision_factory(kind, name, size)
                out.append((f"torchvision.{kind}", name, factory, shape))
    return out


# Families the sweep cannot analyse (fx cannot trace them, or they need inputs the sweep does not
# build) that are known, from their code, to have no conv-layout residual block: plain ViTs.
NO_CONV_RESIDUAL = {
    "gemma4_vit": "ViT encoder (tokens, channels last)",
    "deepseek_vit": "ViT encoder (tokens, channels last)",
    "qwen3_vit": "ViT encoder (tokens, channels last)",
    "hiera": "hierarchical ViT (tokens, channels last)",
    "xcit": "token transformer; its two undecided adds are class-attention adds on (B, N, C) tokens",
}


def has_conv_residual(o: Outcome) -> bool:
    """Whether a model shows conv-layout residual blocks (handled or not).

    Evidence: sites, refused blocks, adds left undecided, or a model the sweep could not analyse
    at all (counted against coverage unless known to be a pure transformer).
    """
    if o.family in NO_CONV_RESIDUAL:
        return False
    unresolved = {"channel-dim-unknown", "untraceable-block", "train-eval-differ", "unverified", "shared-module"}
    return (o.sites > 0 or o.status in ("refused", "fx-limit", "bug", "input")
            or bool(unresolved & set(o.skipped)))


def summarize(outcomes: list[Outcome]) -> dict[str, Any]:
    with_blocks = [o for o in outcomes if has_conv_residual(o)]
    handled = [o for o in with_blocks if o.status == "handled"]
    by_status: dict[str, int] = {}
    for o in outcomes:
        by_status[o.status] = by_status.get(o.status, 0) + 1
    return {"models": len(outcomes), "by_status": by_status,
            "with_conv_residual_blocks": len(with_blocks), "handled": len(handled),
            "coverage": len(handled) / len(with_blocks) if with_blocks else None,
            "silently_wrong": sum(o.status == "bug" and o.message.startswith("identity-init output differs")
                                  for o in outcomes)}


def render(outcomes: list[Outcome], summary: dict[str, Any], console: Console,
           title: str = "se_inject coverage") -> str:
    cols = ("family", "model", "status", "traced", "sites", "skipped by reason", "verified", "compiled", "s")
    rows = []
    for o in outcomes:
        skipped = ", ".join(f"{r} {n}" for r, n in sorted(o.skipped.items())) or "–"
        verified = "–" if o.max_rel_diff is None else ("yes" if o.status == "handled" else "NO")
        compiled = "–" if o.compiled is None else ("yes" if o.compiled else "no")
        rows.append((o.family, o.model, o.status, o.traced, str(o.sites), skipped, verified, compiled, f"{o.seconds:.1f}"))
    md = [table(console, title, cols, rows, align="llllrlllr")]
    problems = [o for o in outcomes if o.status in ("bug", "refused", "fx-limit", "input", "skipped") or o.refused]
    if problems:
        md += ["", "Messages:", ""] + [f"- **{o.model}** ({o.status}): {o.message}" for o in problems]
    headline = (f"Handled with verified equivalence: **{summary['handled']} / {summary['with_conv_residual_blocks']}** "
                f"models with conv-layout residual blocks; silently wrong: **{summary['silently_wrong']}**; "
                f"by status: {summary['by_status']}.")
    console.print(headline)
    return "\n".join([headline, "", *md]) + "\n"


def sweep(families: Optional[list[str]] = None, *, size: int = 64, include_torchvision: bool = False,
          compile_model: bool = False, console: Optional[Console] = None,
          options: Optional[dict[str, Any]] = None) -> list[Outcome]:
    """Run the sweep and return one outcome per model (a rich progress bar while it runs)."""
    todo = [(family, name, factory, shape, None if family.startswith("torchvision") else _timm_default_shape(name))
            for family, name, factory, shape in jobs(families, size, include_torchvision)]
    return _run_all(todo, compile_model, console, options)


def sweep_hf(model_types: Optional[list[str]] = None, *, compile_model: bool = False,
             console: Optional[Console] = None, options: Optional[dict[str, Any]] = None) -> list[Outcome]:
    """The transformers group: one outcome per ``*ForImageClassification`` model type."""
    return _run_all(hf_jobs(model_types), compile_model, console, options)


def _run_all(todo: list[tuple[str, str, Union[Callable, str], Any, Any]], compile_model: bool,
             console: Optional[Console], options: Optional[dict[str, Any]] = None) -> list[Outcome]:
    console = console or Console(stderr=True)
    outcomes = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("sweep", total=len(todo))
        for family, name, factory, shape, full in todo:
            progress.update(task, description=f"{family}: {name}")
            if isinstance(factory, str):  # not built, for the reason given
                outcome = Outcome(family, name, [], status="skipped", message=factory)
            else:
                outcome = run_one(family, name, factory, shape, compile_model=compile_model, options=options)
                if outcome.status == "input" and full is not None and full != tuple(shape):  # its own size
                    outcome = run_one(family, name, factory, full, compile_model=compile_model, options=options)
            outcomes.append(outcome)
            progress.advance(task)
    return outcomes


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", help="timm families (modules) to sweep (default: all)")
    p.add_argument("--subset", choices=["ci"], help="a named subset of families")
    p.add_argument("--no-torchvision", action="store_true", help="skip the torchvision models")
    p.add_argument("--hf", action="store_true", help="only the transformers models (coverage-hf.md)")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers models")
    p.add_argument("--size", type=int, default=64, help="input side for models without a fixed size")
    p.add_argument("--compile", action="store_true", help="also torch.compile each result (slow)")
    p.add_argument("--attn", default="se", help="the attention to insert (se_inject's attn=; default se)")
    p.add_argument("--position", default="branch", help="where (se_inject's position=; default branch)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    families = CI_FAMILIES if args.subset == "ci" else args.families
    console = Console()
    options = {k: v for k, v in (("attn", args.attn), ("position", args.position))
               if v != se_inject.SEOptions.__dataclass_fields__[k].default}
    named = "".join(f", {k}={v}" for k, v in options.items())
    title = f"Coverage{named} (timm {timm.__version__}, torch {torch.__version__})"
    data: dict[str, Any] = {}
    markdown = ""
    if not args.hf:
        outcomes = sweep(families, size=args.size, include_torchvision=not args.no_torchvision and families is None,
                         compile_model=args.compile, options=options)
        summary = summarize(outcomes)
        markdown = render(outcomes, summary, console)
        data = {"summary": summary, "outcomes": [asdict(o) for o in outcomes]}
    if args.hf or (families is None and not args.no_hf and not options):
        import transformers

        hf_outcomes = sweep_hf(HF_CI if args.subset == "ci" else None, compile_model=args.compile, options=options)
        hf_summary = summarize(hf_outcomes)
        hf_md = render(hf_outcomes, hf_summary, console, title="transformers *ForImageClassification")
        hf_data = {"transformers": transformers.__version__, "summary": hf_summary,
                   "outcomes": [asdict(o) for o in hf_outcomes]}
        hf_title = f"Coverage of transformers {transformers.__version__}{named} (torch {torch.__version__})"
        if args.hf:
            data, markdown, title = hf_data, hf_md, hf_title
        else:  # the full sweep: the group goes into coverage.md and into coverage-hf.md as --hf writes it
            data["hf"] = hf_data
            markdown += f"\n## transformers {transformers.__version__}\n\n" + hf_md
            if args.subset is None:
                write_results("coverage-hf", hf_data, hf_md, script="coverage.py", argv=argv, out=args.out,
                              title=hf_title)
    stem = "-".join(["coverage"] + (["hf"] if args.hf else [] if families is None else ["subset"])
                    + list(options.values()))
    path = write_results(stem, data, markdown, script="coverage.py", argv=argv, out=args.out, title=title)
    console.print(f"wrote {path} and .json")


if __name__ == "__main__":
    main()
