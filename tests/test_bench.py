"""se_inject.bench and `se-inject bench`: what the harness measures and reports, never how fast.

A tiny model (resnet18 at 32 px, batch 2, few rounds of one iteration) keeps these on the CPU and
quick; the compile tests use torch.compile's "eager" backend, which exercises dynamo (its caches,
guards and recompile limit) without inductor's minutes of code generation.
"""

import json
import statistics
import subprocess
import sys

import pytest
import timm
import torch
import torch._dynamo
from torch import nn

import se_inject
from se_inject.cost import memory, timing
from se_inject.cost.variants import TWINS, build_variants, timm_twin
from se_inject.cli import main
from se_inject.options import SEOptions
from tests.helpers import ATTENTION_PAIRS, SE_PAIRS

TINY = dict(batch_sizes=2, img_size=32, reps=1, warmup=1)


@pytest.fixture(scope="module")
def eager_run():
    """One eager run, inference and training, original / se_inject / timm, three rounds."""
    cells = []
    result = se_inject.bench("resnet18", compiled=[False], rounds=3, on_cell=cells.append, **TINY)
    return result, cells


# -- the result ----------------------------------------------------------------------------------

def test_result_json_holds_the_settings_environment_variants_and_every_cell(eager_run):
    result, _ = eager_run
    data = json.loads(json.dumps(result.to_dict()))
    assert set(data) == {"settings", "environment", "models", "cells"}
    assert data["settings"]["variants"] == ["original", "se_inject", "timm"]
    assert (data["settings"]["batch_sizes"], data["settings"]["img_size"], data["settings"]["device"]) == ([2], 32, "cpu")
    assert data["settings"]["options"]["reduction"] == 16
    assert {"device", "torch", "timm", "se_inject", "triton", "python"} <= set(data["environment"])
    (model,) = data["models"]
    assert (model["model"], model["input_size"], model["twin"], model["error"]) == ("resnet18", [3, 32, 32],
                                                                                  "seresnet18", None)
    assert [(v["name"], v["model"], v["params"]) for v in model["variants"]] == [
        ("original", "resnet18", 11_689_512), ("se_inject", "resnet18", 11_779_624), ("timm", "seresnet18", 11_779_624)]
    assert [v["kernels"] for v in model["variants"]] == [None, "auto", None]
    assert model["variants"][1]["flops"] == model["variants"][2]["flops"] > model["variants"][0]["flops"]
    assert [(c["mode"], c["compiled"], c["rounds"], c["skipped"]) for c in data["cells"]] == [
        ("infer", False, 3, None), ("train", False, 3, None)]
    for cell in data["cells"]:
        assert [t["variant"] for t in cell["timings"]] == ["original", "se_inject", "timm"]
        assert set(cell["overhead"]) == {"se_inject", "timm"} and set(cell["vs_twin"]) == {"se_inject"}
        for t in cell["timings"]:
            assert set(t) == {"variant", "rounds_ms", "ms", "images_per_s", "warmup_s", "saved_bytes",
                              "cuda_peak_bytes"}
            assert len(t["rounds_ms"]) == 3 and all(ms > 0 for ms in t["rounds_ms"])
            assert t["cuda_peak_bytes"] is None and t["warmup_s"] > 0


def test_times_and_overheads_are_computed_from_the_returned_rounds(eager_run):
    result, _ = eager_run

    def quartiles(values):
        q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
        return pytest.approx((q2, q1, q3), rel=1e-12)

    for cell in result.cells:
        rounds = {t.variant: t.rounds_ms for t in cell.timings}
        for t in cell.timings:
            assert (t.ms.median, t.ms.q1, t.ms.q3) == quartiles(t.rounds_ms)
            per_second = [2 * 1e3 / ms for ms in t.rounds_ms]
            assert (t.images_per_s.median, t.images_per_s.q1, t.images_per_s.q3) == quartiles(per_second)
        for variant, spread in cell.overhead.items():
            ratios = [a / b - 1 for a, b in zip(rounds[variant], rounds["original"])]
            assert (spread.median, spread.q1, spread.q3) == quartiles(ratios)
        ratios = [a / b - 1 for a, b in zip(rounds["se_inject"], rounds["timm"])]
        spread = cell.vs_twin["se_inject"]
        assert (spread.median, spread.q1, spread.q3) == quartiles(ratios)


def test_each_cell_goes_to_on_cell_as_it_finishes(eager_run):
    result, cells = eager_run
    assert cells == list(result.cells) and all(a is b for a, b in zip(cells, result.cells))


def test_saved_for_backward_bytes_are_equal_for_se_inject_and_timms_twin_and_larger_than_the_original(eager_run):
    result, _ = eager_run
    infer, train = result.cells
    assert {t.saved_bytes for t in infer.timings} == {None}
    saved = {t.variant: t.saved_bytes for t in train.timings}
    assert saved == {"original": 47_720_960, "se_inject": 48_227_840, "timm": 48_227_840}


def test_the_tables_show_the_variants_the_timings_and_the_memory(eager_run):
    from rich.console import Console

    from se_inject.cli.render import render_bench

    result, _ = eager_run
    console = Console(record=True, width=250)
    render_bench(result, console)
    text = console.export_text()
    train = result.cells[1]
    overhead = train.overhead["se_inject"]
    for expected in ("seresnet18", "11,779,624", "resnet18  ·  batch 2", "45.5 MiB", "46.0 MiB (+1.1%)",
                     f"{100 * overhead.median:+.1f}% ({100 * overhead.q1:+.1f}…{100 * overhead.q3:+.1f})",
                     f"{train.timing('timm').ms.median:.2f}"):
        assert expected in text, expected


def test_saved_for_backward_counts_each_storage_once_whatever_views_or_ops_save_it():
    x = torch.randn(4, 8, requires_grad=True)
    with memory.saved_for_backward() as saved:
        y = x * 2
        z = (y * y).sum() + (y.view(32) * y.view(32)).sum()  # y saved four times, as itself and as views
    assert (saved.storages, saved.bytes) == (1, 4 * 8 * 4)
    with memory.saved_for_backward() as saved:
        (x.exp() * x[:, :1]).sum()  # exp saves its result; the product saves it and x's view
    assert (saved.storages, saved.bytes) == (2, 2 * 4 * 8 * 4)
    del z


@pytest.mark.slow
def test_resnet50_training_memory_is_the_issues_figure():
    """resnet50, batch 8, 128 px, training: 311.9 MiB saved for backward, se_inject and
    seresnet50 377.4 MiB (+21.0%), with or without fuse_residual."""
    def saved(**options):
        built = build_variants("resnet50", variants=("original", "se_inject", "timm"), options=options, seed=0,
                               img_size=128)
        x = torch.randn(8, 3, 128, 128)
        out = {}
        for name, model in built.models.items():
            with memory.saved_for_backward() as counter:
                model.train()(x)
            out[name] = counter.bytes
        return out

    fused, unfused = saved(), saved(fuse_residual=False)
    assert fused == {"original": 327_003_648, "se_inject": 395_731_968, "timm": 395_731_968}
    assert unfused == fused
    assert round(fused["original"] / 2 ** 20, 1) == 311.9 and round(fused["se_inject"] / 2 ** 20, 1) == 377.4
    assert round(100 * (fused["se_inject"] / fused["original"] - 1), 1) == 21.0


# -- the twins -----------------------------------------------------------------------------------

def test_the_twin_of_resnet50_is_seresnet50_and_convnext_tiny_has_none():
    assert timm_twin("resnet50", SEOptions()) == ("seresnet50", "")
    twin, why = timm_twin("convnext_tiny", SEOptions())
    assert twin is None and why == "timm has no seconvnext_tiny (the se models of timm's resnet.py)"
    assert timm_twin("resnet50", SEOptions(position="pre"))[0] is None
    assert timm_twin("resnet50", SEOptions(act_layer="silu"))[1].startswith("timm's SE models use a ReLU")


def test_the_one_twin_table_gives_every_pair_the_equivalence_tests_know():
    for base, native, _ in SE_PAIRS:
        assert timm_twin(base, SEOptions()) == (native, ""), base
    for plain, attention, attn, position, *_ in ATTENTION_PAIRS:
        assert timm_twin(plain, SEOptions(attn=attn, position=position)) == (attention, ""), attention
    assert {(a, p) for *_, a, p, _, _ in ATTENTION_PAIRS} <= set(TWINS)


def test_a_twin_with_another_parameter_count_is_left_out_and_the_result_says_why():
    built = build_variants("resnet18", variants=("original", "se_inject", "timm"), options={"reduction": 8}, seed=0,
                           img_size=32)
    assert list(built.models) == ["original", "se_inject"] and built.record.twin is None
    assert built.record.twin_note == ("timm's seresnet18 has 11,779,624 parameters and se_inject's resnet18 11,865,752: "
                                      "not the same model with these options, so it is left out")


def test_every_variant_is_built_from_the_seed():
    one = build_variants("resnet18", variants=("original", "se_inject", "timm"), options={}, seed=3, img_size=32)
    two = build_variants("resnet18", variants=("original", "se_inject", "timm"), options={}, seed=3, img_size=32)
    for name in one.models:
        for (k, a), b in zip(one.models[name].state_dict().items(), two.models[name].state_dict().values()):
            assert torch.equal(a, b), (name, k)
    torch.manual_seed(3)
    assert torch.equal(one.models["timm"].conv1.weight, timm.create_model("seresnet18").conv1.weight)


def test_a_module_passed_in_is_benchmarked_on_a_copy():
    model = timm.create_model("resnet18")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = se_inject.bench(model, variants=["original", "se_inject", "timm"], modes=["train"], compiled=[False],
                             rounds=1, **TINY)
    assert result.models[0].model == "ResNet" and result.models[0].twin_note == "a twin is looked up by timm model name"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.training  # not put in train/eval mode either: it was never touched


# -- the time budget -----------------------------------------------------------------------------

def test_cells_that_do_not_fit_the_budget_are_recorded_as_skipped():
    cells = []
    result = se_inject.bench("resnet18", variants=["original"], compiled=[False], rounds=1, budget_s=1e-3,
                             on_cell=cells.append, **TINY)
    assert [(c.mode, c.rounds, c.timings, c.skipped is not None) for c in result.cells] == [
        ("infer", 0, (), True), ("train", 0, (), True)]
    assert result.cells[0].skipped.startswith("time budget: 0 s left") and cells == list(result.cells)


def test_rounds_stop_at_the_deadline_but_one_always_runs():
    calls = []
    stop = timing.Stop(rounds=5, deadline=0.0)  # long past
    times = timing.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, reps=2, stop=stop,
                               device=torch.device("cpu"))
    assert [len(v) for v in times.values()] == [1, 1] and calls == ["a", "a", "b", "b"]
    calls.clear()
    timing.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, reps=1,
                       stop=timing.Stop(rounds=3), device=torch.device("cpu"))
    assert calls == ["a", "b", "b", "a", "a", "b"]  # the order rotates every round


# -- torch.compile: fresh compiles, no silent eager ----------------------------------------------

class _BreaksFirst(nn.Module):
    """A graph break before the model: dynamo compiles the rest as frames of this class's code,
    which every variant wrapped in it shares."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        torch._dynamo.graph_break()
        return self.inner(x)


class _CountsCalls(nn.Module):
    """Multiplies by its call count: compiled code guards on the count, so every call recompiles."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x) * self.calls


def _dynamo_flags():
    return torch._dynamo.config.fail_on_recompile_limit_hit, torch._dynamo.config.error_on_recompile


@pytest.mark.slow
def test_compiled_variants_each_compile_fresh_even_with_a_recompile_limit_of_one():
    variants = ["original", "se_inject", "se_inject plain", "timm"]
    with torch._dynamo.config.patch(recompile_limit=1):
        result = se_inject.bench("resnet18", variants=variants, modes=["infer"], compiled=[True], backend="eager",
                                 rounds=2, **TINY)
        # the same models compiled the usual way share ResNet.forward's cache: the second one hits the limit
        built = build_variants("resnet18", variants=tuple(variants), options={}, seed=0, img_size=32)
        x = torch.randn(2, 3, 32, 32)
        with pytest.raises(torch._dynamo.exc.FailOnRecompileLimitHit), torch.no_grad(), \
                torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            torch._dynamo.reset()
            for model in built.models.values():
                torch.compile(model.eval(), backend="eager")(x)
    assert [t.variant for t in result.cells[0].timings] == variants and result.cells[0].rounds == 2
    assert _dynamo_flags() == (False, False)


@pytest.mark.slow
def test_a_recompile_limit_hit_raises_instead_of_timing_eager_code():
    with torch._dynamo.config.patch(recompile_limit=1), pytest.raises(se_inject.BenchError) as info:
        se_inject.bench(_BreaksFirst(timm.create_model("resnet18")), variants=["original", "se_inject"],
                        modes=["infer"], compiled=[True], backend="eager", rounds=1, **TINY)
    message = str(info.value)
    assert message.startswith("_BreaksFirst b2 infer compiled, se_inject: FailOnRecompileLimitHit")
    assert "would have run it eagerly" in message
    assert _dynamo_flags() == (False, False)  # the guards are restored, after an error too


@pytest.mark.slow
def test_a_timed_round_that_would_recompile_raises():
    with pytest.raises(se_inject.BenchError, match=r"the timed rounds: RecompileError: .*timing the compiler"):
        se_inject.bench(_CountsCalls(timm.create_model("resnet18")), variants=["original"], modes=["infer"],
                        compiled=[True], backend="eager", rounds=2, **TINY)
    assert _dynamo_flags() == (False, False)


# -- bad input -----------------------------------------------------------------------------------

BAD = [
    (["resnet5O"], "unknown model 'resnet5O'; did you mean resnet50"),
    (["resnet18", "--batch-size", "0"], "batch size must be a positive integer, got 0"),
    (["resnet18", "--dtype", "fp16", "--device", "cpu"], "dtype 'fp16' is for CUDA"),
    (["resnet18", "--rounds", "0"], "rounds must be a positive integer, got 0"),
    (["resnet18", "--attn", "eca", "--variants", "se_inject plain"], "force SE kernels, which are for attn='se'"),
    pytest.param(["resnet18", "--device", "cuda"], "device 'cuda' asked for, but torch sees no CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
]


@pytest.mark.parametrize("argv, message", BAD, ids=["unknown-model", "batch-0", "fp16-cpu", "rounds-0",
                                                    "kernels-variant-eca", "cuda-without-gpu"])
def test_bad_input_is_one_line_and_exit_status_2(argv, message, capsys):
    assert main(["bench", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error ") and message in lines[0], captured.err


def test_the_library_raises_se_injects_errors_for_bad_settings():
    with pytest.raises(se_inject.OptionError, match="batch size must be a positive integer, got 0"):
        se_inject.bench("resnet18", batch_sizes=[2, 0])
    with pytest.raises(se_inject.OptionError, match="dtype 'fp16' is for CUDA"):
        se_inject.bench("resnet18", device="cpu", dtype="fp16")
    with pytest.raises(se_inject.OptionError, match="variants: 'timm SE' is not one of"):
        se_inject.bench("resnet18", variants=["original", "timm SE"])
    with pytest.raises(se_inject.UnknownModelError, match="unknown model 'resnet5O'"):
        se_inject.bench("resnet5O", device="cpu")
    with pytest.raises(se_inject.OptionError, match="reduction must be a positive integer"):
        se_inject.bench("resnet18", device="cpu", reduction=0)


# -- the command ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_command_prints_json_and_keeps_it_with_the_command_line(tmp_path, capsys):
    out = tmp_path / "r" / "bench.json"
    argv = ["bench", "resnet18", "--img-size", "32", "--batch-size", "2", "--rounds", "1", "--reps", "1",
            "--warmup", "1", "--compile", "eager", "--modes", "train", "--variants", "original", "se_inject",
            "--reduction", "8", "--json", "--out", str(out)]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    kept = json.loads(out.read_text())
    assert printed == kept and kept["command"] == "se-inject " + " ".join(argv)
    assert kept["settings"]["options"]["reduction"] == 8 and kept["models"][0]["variants"][1]["params"] == 11_865_752
    assert [t["variant"] for t in kept["cells"][0]["timings"]] == ["original", "se_inject"]


@pytest.mark.slow
def test_importing_se_inject_leaves_the_harness_unloaded():
    code = ("import sys, se_inject; print(callable(se_inject.bench), "
            "[m for m in ('se_inject.cost.run', 'se_inject.cost.steps', 'se_inject.cost.variants') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.stdout.split("\n")[0] == "True []", done.stderr


def test_building_the_variants_leaves_the_callers_random_stream_as_it_was():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    build_variants("resnet18", variants=("original", "se_inject"), options={}, seed=0, img_size=32)
    assert torch.equal(torch.rand(3), expected)


def test_a_model_that_cannot_be_converted_is_a_failure_and_the_others_still_run():
    plain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    result = se_inject.bench([plain, "resnet18"], variants=["original", "se_inject"], modes=["infer"],
                             compiled=[False], rounds=1, **TINY)
    assert list(result.failures) == ["Sequential"]
    assert result.failures["Sequential"].startswith("Sequential has no residual add that can take an SE block")
    assert [(c.model, [t.variant for t in c.timings]) for c in result.cells] == [("resnet18", ["original", "se_inject"])]


def test_a_hugging_face_directory_is_benchmarked_from_its_config(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic",
                                       num_labels=10)
    transformers.ResNetForImageClassification(config).save_pretrained(tmp_path)
    result = se_inject.bench(str(tmp_path), modes=["train"], compiled=[False], rounds=1, **TINY)
    (model,) = result.models
    assert [(v.name, v.params) for v in model.variants] == [("original", 21_914), ("se_inject", 22_746)]
    assert model.twin_note == "a twin is looked up by timm model name"
    saved = {t.variant: t.saved_bytes for t in result.cells[0].timings}
    assert saved["se_inject"] > saved["original"]
