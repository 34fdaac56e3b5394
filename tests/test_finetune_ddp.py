"""examples/finetune.py run as users run it: under torchrun with 2 CPU processes (gloo on loopback), and
as a single process from a source checkpoint.

Each run writes one summary JSON per rank (losses, parameter checksum, first-step SE gradient norms)
and saves the model with se_inject.save; the tests read both back.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import se_inject

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "finetune.py"
TIMEOUT_S = 300  # one run takes about 10-20 s on 2 idle cores; the bound only stops a hang

# A tiny problem the model overfits in a few steps: resnet10t on 8 random 32x32 images of 4 classes.
# With 2 ranks x 4 images per step, every step sees the whole data set, so the rank-averaged loss
# is a full-batch loss and falls steadily. zero_init_last=False: timm zeroes the last BatchNorm of
# each residual branch by default, which would give the SE blocks (inputs all zero) no gradient.
TINY = ["resnet10t", "--input-size", "32", "--num-classes", "4", "--fake-size", "8", "--batch-size", "4",
        "--workers", "0", "--seed", "0"]


def _example():
    """examples/finetune.py as a module (for its checksum function)."""
    spec = importlib.util.spec_from_file_location("finetune_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    """Ids of every live process below ``pid`` (Linux /proc; empty elsewhere)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` and everything it started. torchrun puts each worker in a session of its own,
    so killing torchrun's process group alone would leave the workers running."""
    pids = _descendants(proc.pid)
    for pid in [proc.pid, *pids]:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # start_new_session made proc the leader of its group
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _run(args: list[str]) -> str:
    """Run a command from the repository root, bounded by TIMEOUT_S; return its output, fail on error."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")  # 2 cores: no thread oversubscription
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"  # gloo on loopback, whatever the host name resolves to
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        output, _ = proc.communicate()
        pytest.fail(f"{' '.join(args)} did not finish in {TIMEOUT_S} s; output:\n{output[-5000:]}")
    finally:
        if proc.poll() is None:  # interrupted (Ctrl-C) or failed while waiting
            _kill_tree(proc)
    assert proc.returncode == 0, f"exit code {proc.returncode}; output:\n{output[-5000:]}"
    assert not _descendants(proc.pid)
    return output


def _torchrun(nproc: int, args: list[str]) -> str:
    for attempt in range(2):  # the free port can be taken before torchrun binds it; retry once
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                   "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(SCRIPT), *args]
        try:
            return _run(command)
        except AssertionError as e:
            if attempt == 1 or "address already in use" not in str(e).lower():
                raise
    raise AssertionError("unreachable")


def _summaries(directory: Path, world_size: int) -> list[dict]:
    assert sorted(p.name for p in directory.iterdir()) == [f"summary-rank{r}.json" for r in range(world_size)]
    return [json.loads((directory / f"summary-rank{r}.json").read_text()) for r in range(world_size)]


def test_torchrun_two_cpu_processes(tmp_path):
    steps = 8
    output = _torchrun(2, [*TINY, "--steps", str(steps), "--lr", "1e-3", "--model-kwarg", "zero_init_last=false",
                           "--summary", str(tmp_path / "summary"), "--out", str(tmp_path / "model")])
    ranks = _summaries(tmp_path / "summary", 2)

    assert [s["rank"] for s in ranks] == [0, 1] and all(s["world_size"] == 2 for s in ranks)
    assert output.count("SE blocks") == 1  # only rank 0 prints
    # SE went in as an identity.
    assert ranks[0]["sites"] == ["layer1.0.se", "layer2.0.se", "layer3.0.se", "layer4.0.se"]
    assert all(s["identity_max_abs_diff"] < 1e-5 for s in ranks)
    # Each rank trained on its own shard, but DDP kept the replicas identical, bit for bit.
    assert all(len(s["losses"]) == steps for s in ranks)
    assert ranks[0]["losses"] != ranks[1]["losses"]
    assert ranks[0]["param_checksum"] == ranks[1]["param_checksum"]
    # Every SE parameter got a (synchronised) gradient at the first step.
    grads = ranks[0]["se_grad_norms_step1"]
    assert len(grads) == 4 * 4  # fc1/fc2 weight and bias per block
    assert all(norm > 0 for norm in grads.values()), grads
    assert ranks[1]["se_grad_norms_step1"] == grads
    # The model learns: the loss averaged over both ranks (the whole data set) falls.
    mean = [(a + b) / 2 for a, b in zip(ranks[0]["losses"], ranks[1]["losses"])]
    assert mean == pytest.approx(ranks[0]["mean_losses"], rel=1e-5)
    first, last = sum(mean[:2]) / 2, sum(mean[-2:]) / 2
    assert last < 0.5 * first, mean
    # Rank 0 saved the trained parameters; se_inject.load rebuilds exactly them.
    model = se_inject.load(tmp_path / "model")
    assert _example().param_checksum(model) == ranks[0]["param_checksum"]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)


def test_single_process_from_checkpoint(tmp_path):
    """No torchrun: no process group. The checkpoint (1000 classes, as timm builds resnet10t) is
    loaded, its head replaced by a 4-class one; with lr 0 the saved backbone is the checkpoint's."""
    torch.manual_seed(1)
    source = timm.create_model("resnet10t", zero_init_last=False)
    checkpoint = tmp_path / "resnet10t.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(checkpoint))

    _run([sys.executable, str(SCRIPT), *TINY, "--steps", "2", "--lr", "0", "--checkpoint", str(checkpoint),
          "--summary", str(tmp_path / "summary"), "--out", str(tmp_path / "model")])
    (summary,) = _summaries(tmp_path / "summary", 1)

    assert summary["world_size"] == 1 and summary["device"] == "cpu"
    assert summary["identity_max_abs_diff"] < 1e-5
    assert all(norm > 0 for norm in summary["se_grad_norms_step1"].values())
    model = se_inject.load(tmp_path / "model")
    assert _example().param_checksum(model) == summary["param_checksum"]
    saved = dict(model.named_parameters())
    assert saved["fc.weight"].shape == (4, source.num_features)
    backbone = {k: v for k, v in source.named_parameters() if not k.startswith("fc.")}
    for name, value in backbone.items():
        assert torch.equal(saved[name], value), name
