"""Fine-tune a timm model after adding SE blocks, on one process or many (DistributedDataParallel).

The steps:

1. build a timm model (random weights, or a source checkpoint with ``--checkpoint``);
2. add SE blocks with ``identity_init=True``: every new block starts as an exact identity, so the
   network computes what it computed before (checked and printed on a batch), while every SE
   parameter still receives a gradient from the first step;
3. fine-tune on an image folder (``--data``, read with ``torchvision.datasets.ImageFolder``) or, when
   none is given, on ``torchvision.datasets.FakeData``; on CUDA with automatic mixed precision
   (bf16 where the GPU supports it, else fp16 with a gradient scaler);
4. save the result with ``se_inject.save`` (``--out``): ``model.safetensors`` + ``recipe.json``,
   which ``se_inject.load(out)`` rebuilds.

Single process (CPU, or the first GPU)::

    python examples/finetune.py resnet18 --steps 20 --batch-size 16 --input-size 64 --out runs/se-resnet18

Several processes on one machine, one per GPU (backend nccl) or per CPU worker (backend gloo)::

    torchrun --nproc_per_node 2 examples/finetune.py resnet18 --steps 20 --out runs/se-resnet18

Fine-tune ImageNet weights on your own folder of images (one subfolder per class)::

    torchrun --nproc_per_node 4 examples/finetune.py resnet50 --checkpoint resnet50.safetensors \\
        --data /data/flowers/train --input-size 224 --epochs 5 --lr 3e-4 --out runs/se-resnet50

Under ``torchrun`` (detected from the ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` variables it sets)
each process drives one replica wrapped in ``DistributedDataParallel`` and reads its own shard of
the data through a ``DistributedSampler``; ``--batch-size`` is per process. Only rank 0 prints,
shows the progress bar and saves. ``--summary DIR`` makes every rank write
``DIR/summary-rank{r}.json`` (losses, parameter checksum, first-step SE gradient norms), which is
what the tests compare across ranks.

Note on random weights: timm's ResNets zero the last BatchNorm of every residual branch
(``zero_init_last=True``), so at initialisation the branch, and with it the input of each SE block,
is zero and the SE parameters get no gradient until those BatchNorms have moved. A pretrained
checkpoint does not have this problem; with random weights pass
``--model-kwarg zero_init_last=false`` to see SE learn from the first step.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Optional

import timm
import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler
from torchvision import datasets, transforms

import se_inject

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------- arguments

def _model_kwarg(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE read as JSON when it parses (``false``, ``0.1``), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="timm model name, e.g. resnet18")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="source weights (.safetensors or a torch state_dict) for the model as timm builds it "
                        "by default; the classifier is replaced when --num-classes differs")
    p.add_argument("--checkpoint-num-classes", type=int, default=None,
                   help="classes of the checkpoint's classifier (default: timm's default for the model)")
    p.add_argument("--model-kwarg", type=_model_kwarg, action="append", default=[], metavar="KEY=VALUE",
                   help="extra keyword argument for timm.create_model (repeatable), recorded in the recipe")
    p.add_argument("--reduction", type=int, default=16, help="SE reduction ratio")
    p.add_argument("--data", type=Path, default=None,
                   help="ImageFolder directory (one subfolder per class); FakeData when not given")
    p.add_argument("--fake-size", type=int, default=256, help="number of FakeData images")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classes to train for (default: the folder's classes, or 10 for FakeData)")
    p.add_argument("--input-size", type=int, default=224, help="image side in pixels")
    p.add_argument("--epochs", type=int, default=1, help="passes over the data (ignored with --steps)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps to run (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=32, help="images per step and per process")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes per process")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto",
                   help="mixed precision on CUDA (auto: bf16 if supported, else fp16); always off on CPU")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even when CUDA is available")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, data order and FakeData")
    p.add_argument("--out", type=Path, default=None, help="directory to save the fine-tuned model to")
    p.add_argument("--overwrite", action="store_true", help="replace a model already saved in --out")
    p.add_argument("--summary", type=Path, default=None,
                   help="directory where every rank writes summary-rank{r}.json")
    args = p.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be at least 1")
    if any(key == "num_classes" for key, _ in args.model_kwarg):
        p.error("give the number of classes with --num-classes, not --model-kwarg")
    if args.data is not None and not args.data.is_dir():
        p.error(f"--data {args.data} is not a directory")
    return args


# ------------------------------------------------------------------------------------ distribution

class Dist:
    """Where this process stands: rank, world size and device; plain ``torch.distributed`` underneath."""

    def __init__(self, force_cpu: bool = False) -> None:
        # torchrun sets these for every worker it starts; a plain `python finetune.py` has none.
        self.enabled = "RANK" in os.environ and "WORLD_SIZE" in os.environ
        self.rank = int(os.environ.get("RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        use_cuda = torch.cuda.is_available() and not force_cpu
        self.device = torch.device("cuda", self.local_rank) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(self.device)
        if self.enabled:
            # MASTER_ADDR / MASTER_PORT come from the environment too (init_method "env://").
            if use_cuda:
                dist.init_process_group(backend="nccl", device_id=self.device)
            else:
                dist.init_process_group(backend="gloo")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """Mean of a tensor over all ranks (the tensor itself on one process)."""
        if not self.enabled:
            return value
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value / self.world_size

    def close(self) -> None:
        if self.enabled:
            dist.destroy_process_group()


# -------------------------------------------------------------------------------------------- data

def build_dataset(args: argparse.Namespace) -> tuple[Dataset, int]:
    """The training set and its number of classes."""
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    if args.data is None:
        num_classes = args.num_classes or 10
        dataset = datasets.FakeData(size=args.fake_size, image_size=(3, args.input_size, args.input_size),
                                    num_classes=num_classes, random_offset=args.seed,
                                    transform=transforms.Compose([transforms.ToTensor(), normalize]))
        return dataset, num_classes
    dataset = datasets.ImageFolder(str(args.data), transform=transforms.Compose([
        transforms.RandomResizedCrop(args.input_size),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        normalize,
    ]))
    num_classes = args.num_classes or len(dataset.classes)
    if num_classes < len(dataset.classes):
        raise SystemExit(f"--num-classes {num_classes} but {args.data} has {len(dataset.classes)} classes")
    return dataset, num_classes


def build_loader(dataset: Dataset, args: argparse.Namespace, env: Dist) -> DataLoader:
    """Shuffled batches; under torchrun each rank reads its own shard (``DistributedSampler``)."""
    if env.enabled:
        sampler: Any = DistributedSampler(dataset, num_replicas=env.world_size, rank=env.rank,
                                          shuffle=True, seed=args.seed, drop_last=False)
    else:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(args.seed))
    # drop_last: a batch of one image would break BatchNorm layers in train mode.
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                        pin_memory=env.device.type == "cuda", drop_last=True,
                        persistent_workers=args.workers > 0)
    if len(loader) == 0:
        raise SystemExit(f"{len(sampler)} images per process do not make one batch of {args.batch_size}; "
                         f"lower --batch-size or use more data")
    return loader


def batches(loader: DataLoader, steps: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` batches, going over the data as many times as needed (a new order every epoch)."""
    epoch = 0
    while True:
        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(epoch)  # without this every epoch repeats the same order
        for batch in loader:
            yield batch
            steps -= 1
            if steps == 0:
                return
        epoch += 1


# ------------------------------------------------------------------------------------------- model

def build_model(args: argparse.Namespace, num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    """The source model: random weights, or ``--checkpoint`` loaded strictly, then a new head if needed."""
    if args.checkpoint is None:
        return timm.create_model(args.model, pretrained=False, num_classes=num_classes, **kwargs)
    head = {} if args.checkpoint_num_classes is None else {"num_classes": args.checkpoint_num_classes}
    model = timm.create_model(args.model, pretrained=False, **head, **kwargs)
    se_inject.load_checkpoint(model, args.checkpoint)
    if model.num_classes != num_classes:
        model.reset_classifier(num_classes)  # a fresh classifier for the new task
    return model


def amp_settings(mode: str, device: torch.device) -> tuple[bool, torch.dtype]:
    """Whether to autocast, and to which dtype. Mixed precision is used on CUDA only."""
    if device.type != "cuda" or mode == "off":
        return False, torch.float32
    if mode == "bf16" or (mode == "auto" and torch.cuda.is_bf16_supported()):
        return True, torch.bfloat16
    return True, torch.float16


def param_checksum(model: nn.Module) -> dict[str, Any]:
    """SHA-256 of the bytes of every parameter (in ``named_parameters`` order) and their float64 sum."""
    digest = hashlib.sha256()
    total = 0.0
    for _, p in model.named_parameters():
        t = p.detach().cpu().contiguous()
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        total += t.double().sum().item()
    return {"sha256": digest.hexdigest(), "sum": total}


def se_grad_norms(model: nn.Module) -> dict[str, float]:
    """L2 norm of the current gradient of every SE parameter (0.0 for one without a gradient)."""
    return {name: (p.grad.detach().float().norm().item() if p.grad is not None else 0.0)
            for name, p in model.named_parameters() if ".se." in name}


# -------------------------------------------------------------------------------------------- main

def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    env = Dist(force_cpu=args.cpu)
    console = Console(quiet=not env.is_main)  # only rank 0 prints
    try:
        train(args, env, console)
    finally:
        env.close()


def train(args: argparse.Namespace, env: Dist, console: Console) -> None:
    torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    dataset, num_classes = build_dataset(args)
    loader = build_loader(dataset, args, env)
    steps = args.steps if args.steps is not None else args.epochs * len(loader)

    # 1. The source model, and SE blocks that start as identities. SE goes in before DDP wraps the
    #    model: DDP registers the parameters it synchronises when it is constructed.
    model_kwargs = {"num_classes": num_classes, **dict(args.model_kwarg)}
    source = build_model(args, num_classes, dict(args.model_kwarg)).eval()
    example = torch.randn(1, 3, args.input_size, args.input_size)
    injection = se_inject.inject(source, reduction=args.reduction, identity_init=True, example_inputs=example)
    model = injection.model  # a rewritten copy; `source` is left as it was
    console.print(f"[bold]{args.model}[/]: {len(injection.plan.sites)} SE blocks "
                  f"({', '.join(s.name for s in injection.plan.sites[:4])}"
                  f"{', ...' if len(injection.plan.sites) > 4 else ''})")

    # 2. Same outputs as before, on a real batch (eval mode: BatchNorm uses its running statistics).
    images, _ = next(iter(DataLoader(dataset, batch_size=min(args.batch_size, 8))))
    with torch.no_grad():
        identity_gap = (model.eval()(images) - source(images)).abs().max().item()
    console.print(f"identity_init: max |output with SE - output without| = {identity_gap:.2e} "
                  f"on a batch of {len(images)}")
    del source

    # 3. Fine-tune. DDP needs the model on this rank's device before it wraps it.
    model = model.to(env.device).train()
    net: nn.Module = model
    if env.enabled:
        net = DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    use_amp, amp_dtype = amp_settings(args.amp, env.device)
    # fp16 needs loss scaling against gradient underflow; bf16 has float32's range and does not.
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    criterion = nn.CrossEntropyLoss()
    console.print(f"training on {env.world_size} process(es), device {env.device.type}, "
                  f"{'autocast ' + str(amp_dtype).removeprefix('torch.') if use_amp else 'float32'}, "
                  f"{steps} steps of {args.batch_size} images per process")

    losses: list[float] = []  # this rank's loss at every step
    mean_losses: list[float] = []  # the loss averaged over all ranks (what the bar shows)
    first_grads: dict[str, float] = {}
    columns = (TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=not env.is_main) as progress:
        task = progress.add_task("fine-tuning", total=steps)
        for step, (images, targets) in enumerate(batches(loader, steps)):
            images = images.to(env.device, non_blocking=True)
            targets = targets.to(env.device, non_blocking=True)
            with torch.autocast(device_type=env.device.type, dtype=amp_dtype, enabled=use_amp):
                loss = criterion(net(images), targets)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()  # DDP averages the gradients over ranks during backward
            if step == 0:
                scaler.unscale_(optimizer)  # true gradient values (a no-op without fp16 scaling)
                first_grads = se_grad_norms(model)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            losses.append(loss.item())
            mean_losses.append(env.mean(loss.detach().float()).item())
            progress.update(task, advance=1, description=f"fine-tuning  loss {mean_losses[-1]:.4f}")

    checksum = param_checksum(model)
    no_grad = [name for name, norm in first_grads.items() if norm == 0.0]
    console.print(f"loss {mean_losses[0]:.4f} -> {mean_losses[-1]:.4f}; "
                  f"{len(first_grads) - len(no_grad)}/{len(first_grads)} SE parameters had a gradient at step 1")
    if no_grad:
        console.print("[yellow]some SE parameters got no gradient at step 1: with random weights, timm zeroes "
                      "the last BatchNorm of each residual branch; try --model-kwarg zero_init_last=false")

    if args.summary is not None:
        args.summary.mkdir(parents=True, exist_ok=True)
        summary = {
            "rank": env.rank,
            "world_size": env.world_size,
            "device": str(env.device),
            "steps": steps,
            "identity_max_abs_diff": identity_gap,
            "losses": losses,
            "mean_losses": mean_losses,
            "param_checksum": checksum,
            "se_grad_norms_step1": first_grads,
            "sites": [s.name for s in injection.plan.sites],
        }
        (args.summary / f"summary-rank{env.rank}.json").write_text(json.dumps(summary, indent=2) + "\n")

    # 4. Save from rank 0 only: the replicas hold the same parameters. (BatchNorm running statistics
    #    are rank 0's: DDP broadcasts them from rank 0 at every forward.)
    if args.out is not None and env.is_main:
        model.cpu().eval()
        recipe = se_inject.save(injection, args.out, model_name=args.model, model_kwargs=model_kwargs,
                                overwrite=args.overwrite)
        console.print(f"saved to {recipe.parent} (load with se_inject.load({str(recipe.parent)!r}))")


if __name__ == "__main__":
    sys.exit(main())
