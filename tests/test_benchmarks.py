"""Smoke runs of the benchmark scripts at tiny sizes: JSON keys, equivalence checks, timing helpers."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py`` (the folder is scripts, not a package)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def keep_threads():
    """The scripts' --threads sets torch's global thread count: restore it for the other tests."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


TINY_STEP = [
    "--backbones",
    "conv4",
    "--image-size",
    "16",
    "--ways",
    "2",
    "--shots",
    "2",
    "--queries",
    "2",
    "--meta-batch",
    "2",
    "--inner-steps",
    "1",
    "--rounds",
    "1",
    "--threads",
    "1",
]


# ------------------------------------------------------------------------------------------------ common
def test_quartiles_and_summary() -> None:
    common = load("common")
    assert common.quartiles([5.0]) == (5.0, 5.0, 5.0)
    assert common.quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == (2.0, 3.0, 4.0)
    s = common.summarize_ms([0.001, 0.002, 0.003, 0.004, 0.010])
    assert (s["median_ms"], s["q1_ms"], s["q3_ms"], s["iqr_ms"], s["samples"]) == (3.0, 2.0, 4.0, 2.0, 5)
    assert s["times_ms"] == [1.0, 2.0, 3.0, 4.0, 10.0]


def test_interleaved_rounds_rotate_the_order() -> None:
    common = load("common")
    calls: list[str] = []
    contenders = {n: (lambda n=n: calls.append(n)) for n in ("a", "b", "c")}
    times = common.interleaved_times(contenders, rounds=4)
    assert calls == list("abcbcacababc")
    assert {n: len(t) for n, t in times.items()} == {"a": 4, "b": 4, "c": 4}
    with pytest.raises(ValueError, match="rounds must be >= 1, got 0"):
        common.interleaved_times(contenders, rounds=0)


def test_markdown_table() -> None:
    common = load("common")
    text = common.markdown_table(["x", "y"], [["a", 12.345], ["b", None]])
    assert text.splitlines() == ["| x | y |", "|---|---|", "| a | 12.3 |", "| b | – |"]


# ------------------------------------------------------------------------------------------------ maml_step
def test_maml_step_smoke_and_meta_gradients_agree(tmp_path: Path) -> None:
    maml_step = load("maml_step")
    out = tmp_path / "maml_step.json"
    result = maml_step.main(
        TINY_STEP
        + [
            "--configs",
            "conv4-dense-first",
            "conv4-acdc-second",
            "--dtype",
            "float64",
            "--contenders",
            "ours",
            "higher",
            "ours_vmap",
            "floor",
            "bound",
            "learn2learn",
            "--memory",
            "none",
            "--out",
            str(out),
        ]
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert sorted(result["configs"]) == ["conv4-acdc-second", "conv4-dense-first"]
    for name, row in result["configs"].items():
        for key in (
            "ours_ms",
            "higher_ms",
            "ours_vmap_ms",
            "floor_ms",
            "bound_ms",
            "ratio_vs_higher",
            "ratio_vs_floor",
            "ratio_vs_bound",
            "higher_vs_bound",
            "parameters",
        ):
            assert row[key] > 0, (name, key)
        assert row["ratio_vs_higher"] == pytest.approx(row["ours_ms"] / row["higher_ms"], rel=1e-3)
        assert row["higher_vs_bound"] == pytest.approx(row["higher_ms"] / row["bound_ms"], rel=1e-3)
        for contender in ("ours", "higher", "ours_vmap", "floor", "bound"):
            assert row["contenders"][contender]["samples"] == 1
            assert row["contenders"][contender]["iqr_ms"] == 0.0
        # the same function: higher and the vmapped tasks give our meta-gradients (float64)
        l2l = set() if importlib.util.find_spec("learn2learn") is None else {"learn2learn"}
        assert set(row["grad_rel_diff_vs_ours"]) == {"higher", "ours_vmap"} | l2l
        assert max(row["grad_rel_diff_vs_ours"].values()) < 1e-10, name
    assert result["configs"]["conv4-acdc-second"]["acdc"] == "net"
    assert result["configs"]["conv4-acdc-second"]["first_order"] is False
    if importlib.util.find_spec("learn2learn") is None:
        assert result["learn2learn"].startswith("skipped: learn2learn is not importable")
    else:  # CI installs it: then it is measured, and its meta-gradients agree with ours
        assert result["learn2learn"] == "measured"
    table = out.with_suffix(".md").read_text().splitlines()
    assert table[0].startswith("| configuration | params (M) | ours ms (IQR) | higher ms (IQR)")
    assert table[0].endswith("| ours/higher | ours/ours_vmap | ours/floor | ours/bound | higher/bound |")
    assert len(table) == 4


def test_maml_step_bound_makes_the_first_order_passes_on_fixed_weights() -> None:
    """bound = inner_steps support passes + one query pass per task, weights untouched; its gradient is
    the query-loss gradient at the initial weights (= ours with no inner step)."""
    maml_step = load("maml_step")
    args = maml_step.parse(TINY_STEP + ["--inner-steps", "3", "--dtype", "float64"])
    (config,) = maml_step.select_configs(["conv4-dense-first"], ["conv4"])
    episodes = maml_step.make_episodes(args, torch.device("cpu"))
    model, step = maml_step.build_contender("bound", config, args, torch.device("cpu"), episodes)
    before = [p.detach().clone() for p in model.parameters()]
    batch_sizes: list[int] = []
    model.backbone.register_forward_hook(lambda module, inputs, output: batch_sizes.append(len(inputs[0])))
    step()
    support, query = len(episodes[0].support_images), len(episodes[0].query_images)
    assert batch_sizes == ([support] * 3 + [query]) * len(episodes)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))

    no_steps = maml_step.parse(TINY_STEP + ["--inner-steps", "0", "--dtype", "float64"])
    reference, ours = maml_step.build_contender("ours", config, no_steps, torch.device("cpu"), episodes)
    ours()
    assert maml_step.relative_difference(maml_step.gradients(model), maml_step.gradients(reference)) < 1e-12


def test_maml_step_memory_probe_in_a_subprocess(tmp_path: Path) -> None:
    maml_step, common = load("maml_step"), load("common")
    ballast = torch.ones(400 * 2**20 // 4)  # 400 MiB resident in this (the parent) process
    parent_peak = common.peak_rss_mib()
    result = maml_step.main(
        TINY_STEP + ["--configs", "conv4-dense-first", "--contenders", "floor", "--out", str(tmp_path / "m.json")]
    )
    row = result["configs"]["conv4-dense-first"]
    assert set(row["contenders"]) == {"floor"}
    assert row["contenders"]["floor"]["peak_rss_mib"] >= row["idle_rss_mib"] > 50  # torch alone is more
    # the probe's own peak, not the parent's (ru_maxrss would carry the parent's over fork + exec)
    assert row["contenders"]["floor"]["peak_rss_mib"] < parent_peak - 300
    del ballast


def test_maml_step_rejects_an_unknown_configuration() -> None:
    maml_step = load("maml_step")
    with pytest.raises(
        ValueError, match=r"--configs 'resnet9-\*' matches no configuration; valid: resnet10-dense-first"
    ):
        maml_step.select_configs(["resnet9-*"])
    assert [c.name for c in maml_step.select_configs(["*-acdc-second"])] == [
        "resnet10-acdc-second",
        "resnet18-acdc-second",
    ]


# ------------------------------------------------------------------------------------------------ evaluate
def test_evaluate_smoke_same_accuracies(tmp_path: Path) -> None:
    evaluate = load("evaluate")
    result = evaluate.main(
        [
            "--backbone",
            "conv4",
            "--image-size",
            "16",
            "--ways",
            "3",
            "--queries",
            "3",
            "--episodes",
            "5",
            "--batch",
            "2",
            "--steps",
            "2",
            "--lr",
            "0.5",
            "--threads",
            "1",
            "--dtype",
            "float64",
            "--out",
            str(tmp_path / "evaluate.json"),
        ]
    )
    ours, loop = (result["contenders"][n]["episode_accuracies"] for n in ("ours", "loop"))
    assert len(ours) == 5 and ours == loop
    assert result["identical"] is True and result["mismatched_episodes"] == []
    assert len(set(ours)) > 1  # the episodes differ: a constant would not test anything
    assert result["speedup"] > 0
    assert len(result["contenders"]["ours"]["round_seconds"]) == 3  # rounds of 2, 2, 1 episodes
    assert json.loads((tmp_path / "evaluate.json").read_text())["speedup"] == result["speedup"]
    assert result["settings"]["memory_format"] == "channels_last"  # auto on a CPU, as run_maml.py


def test_evaluate_loop_adapts_the_copy_not_the_model() -> None:
    evaluate = load("evaluate")
    args = evaluate.parse(
        [
            "--backbone",
            "conv4",
            "--image-size",
            "16",
            "--ways",
            "2",
            "--queries",
            "2",
            "--dtype",
            "float64",
            "--steps",
            "2",
            "--lr",
            "0.5",
        ]
    )
    learner = evaluate.build_learner(args, torch.device("cpu"))
    before = {n: p.clone() for n, p in learner.state_dict().items()}
    episode = evaluate.make_episode(0, args, torch.device("cpu"))
    adapted = evaluate.loop_predict(learner, episode, args.steps, args.lr)
    unadapted = evaluate.loop_predict(learner, episode, 0, args.lr)
    assert all(torch.equal(before[n], p) for n, p in learner.state_dict().items())
    assert (adapted - unadapted).abs().max() > 1e-3
    assert torch.allclose(adapted, learner.predict(episode), atol=1e-10)


# ------------------------------------------------------------------------------------------------ acdc_overhead
def test_acdc_overhead_smoke(tmp_path: Path) -> None:
    acdc_overhead = load("acdc_overhead")
    result = acdc_overhead.main(
        [
            "--backbones",
            "conv4",
            "--batch",
            "4",
            "1",
            "--image-size",
            "16",
            "--rounds",
            "2",
            "--warmup",
            "0",
            "--threads",
            "1",
            "--out",
            str(tmp_path / "acdc.json"),
        ]
    )
    assert sorted(result["backbones"]["conv4"]) == ["1", "4"]
    row = result["backbones"]["conv4"]["4"]
    assert row["dense_ms"] > 0 and row["acdc_ms"] > 0 and row["ratio"] > 0
    assert len(row["round_ratios"]) == 2
    assert row["ratio"] == pytest.approx(sum(row["round_ratios"]) / 2, rel=1e-3)  # median of two
    assert row["parameters"]["acdc"] < row["parameters"]["dense"]
    assert json.loads((tmp_path / "acdc.json").read_text())["backbones"]["conv4"]["4"]["ratio"] == row["ratio"]
    assert row["acdc_layers"] == 4 and 0 <= row["two_stage_layers"] <= 4
    assert result["settings"]["acdc"] == "net"


def test_memory_format_times_both_layouts_of_the_main_job(tmp_path: Path) -> None:
    memory_format = load("memory_format")
    out = tmp_path / "mf.json"
    configs = ["main-acdc", "baseline-glyphs"]
    argv = ["--configs", *configs, "--rounds", "2", "--meta-batch", "1", "--threads", "1", "--out", str(out)]
    result = memory_format.main(argv)
    assert list(result["configs"]) == configs
    assert list(result["configs"]["baseline-glyphs"]) == ["supervised_step"]
    for config, kind in (("main-acdc", "train_step"), ("main-acdc", "predict"), ("baseline-glyphs", "supervised_step")):
        row = result["configs"][config][kind]
        times = {layout: row["contenders"][layout]["times_ms"] for layout in ("contiguous", "channels_last")}
        assert all(len(t) == 2 for t in times.values())
        ratios = [c / p for c, p in zip(times["channels_last"], times["contiguous"])]
        assert row["ratio"] == pytest.approx(sum(ratios) / 2, rel=1e-3)  # median of two rounds
    assert json.loads(out.read_text())["configs"] == json.loads(json.dumps(result["configs"]))
    settings, channels = memory_format.run_settings("chen-resnet10")
    chen = (settings.backbone, settings.width, settings.image_size, settings.atoms, channels)
    assert chen == ("resnet10", 64, 84, 8, 3)
    with pytest.raises(SystemExit):
        memory_format.main(["--configs", "main-acdc", "--rounds", "0", "--out", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()


def test_vectorize_times_task_by_task_against_one_vmap(tmp_path: Path) -> None:
    vectorize = load("vectorize")
    out = tmp_path / "vec.json"
    argv = ["--configs", "main-acdc", "--rounds", "2", "--eval-batch", "2", "--threads", "1", "--out", str(out)]
    result = vectorize.main(argv)
    row = result["configs"]["main-acdc"]
    assert row["sizes"] == {"meta_batch": 4, "eval_batch": 2}  # the main job's meta-batch, the given eval batch
    for kind in ("train_step", "predict"):
        times = {v: row[kind]["contenders"][v]["times_ms"] for v in ("task_by_task", "vmap")}
        assert all(len(t) == 2 for t in times.values())
        ratios = [v / t for v, t in zip(times["vmap"], times["task_by_task"])]
        assert row[kind]["ratio"] == pytest.approx(sum(ratios) / 2, rel=1e-3)  # median of two rounds
    assert json.loads(out.read_text())["configs"] == json.loads(json.dumps(result["configs"]))
    with pytest.raises(SystemExit):
        vectorize.main(["--eval-batch", "0", "--out", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()


def test_vectorize_variants_compute_the_same_predictions() -> None:
    vectorize = load("vectorize")
    args = vectorize.parse(["--configs", "main-acdc", "--eval-batch", "3"])
    steps, _ = vectorize.contenders("main-acdc", args)
    learners = [fn.__defaults__[0] for fn in steps["predict"].values()]
    assert [learner.vectorize for learner in learners] == ["off", "all"]
    episodes = vectorize.memory_format.episodes(*vectorize.memory_format.run_settings("main-acdc"), 3, 15, seed=2)
    episodes = [e.to("cpu", memory_format=torch.channels_last) for e in episodes]
    for learner in learners:
        learner.eval()
    for a, b in zip(learners[0].predict_batch(episodes), learners[1].predict_batch(episodes)):
        assert (a - b).abs().max().item() < 1e-4


def test_corner_cut_times_cutting_against_slicing_on_separate_learners(tmp_path: Path) -> None:
    from fewshot.acdc.layer import CoefficientCorners

    corner_cut = load("corner_cut")
    default = CoefficientCorners.min_elements
    out = tmp_path / "cut.json"
    result = corner_cut.main(["--configs", "main-acdc", "--rounds", "2", "--threads", "1", "--out", str(out)])
    row = result["configs"]["main-acdc"]
    assert row["coefficient_elements"] == 32 * 32 * 16  # the main job's Conv4: width 32, 16 atoms
    times = {v: row["contenders"][v]["times_ms"] for v in ("cut", "sliced")}
    assert all(len(t) == 2 for t in times.values())
    ratios = [s / c for s, c in zip(times["sliced"], times["cut"])]
    assert row["ratio"] == pytest.approx(sum(ratios) / 2, rel=1e-3)  # median of two rounds
    assert CoefficientCorners.min_elements == default  # set on each learner's scopes, not on the class
    steps, _ = corner_cut.contenders("main-acdc")
    learners = {v: fn.__defaults__[0] for v, fn in steps.items()}
    thresholds = {
        v: {m.corners.min_elements for m in lr.modules() if hasattr(m, "corners")} for v, lr in learners.items()
    }
    assert thresholds == {"cut": {0}, "sliced": {float("inf")}}
    with pytest.raises(SystemExit):
        corner_cut.main(["--configs", "main-dense", "--out", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()


def test_tall_matmul_times_plain_against_pairs(tmp_path: Path) -> None:
    tall_matmul = load("tall_matmul")
    out = tmp_path / "tall.json"
    argv = ["--rows", "32", "64", "--rounds", "2", "--calls", "2", "--threads", "1", "--out", str(out)]
    result = tall_matmul.main(argv)
    assert list(result["rows"]) == ["32", "64"] and result["settings"]["atoms"] == 16
    assert all(
        row["ratio"] > 0 and set(row["median_us_per_call"]) == {"plain", "pairs"} for row in result["rows"].values()
    )
    assert json.loads(out.read_text())["rows"] == result["rows"]
    with pytest.raises(SystemExit):
        tall_matmul.main(["--rows", "33", "--out", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()


def test_acdc_overhead_per_layer_times_every_resnet_conv_shape(tmp_path: Path) -> None:
    acdc_overhead = load("acdc_overhead")
    argv = ["--backbones", "conv4", "--image-size", "16", "--batch", "1", "2", "--rounds", "1", "--warmup", "0"]
    result = acdc_overhead.main([*argv, "--threads", "1", "--per-layer", "--out", str(tmp_path / "layers.json")])
    rows = result["layers"]
    assert [row["batch"] for row in rows] == [1] * 7 + [2] * 7
    assert rows[0]["shape"] == "64->64 at 21x21, stride 1" and rows[6]["shape"] == "512->512 at 3x3, stride 1"
    last = rows[13]  # 512->512 at 3x3, batch 2: 18 positions x 8 atoms against 512 x 9
    assert last["intermediate_over_kernel"] == pytest.approx(2 * 9 * 8 / (512 * 9), abs=1e-4)
    for row in rows:
        assert row["dense_ms"] > 0 and row["kernel_ratio"] > 0 and row["two-stage_ratio"] > 0
        assert row["auto_runs_two_stage"] == (2 * row["intermediate_over_kernel"] <= 1 + 1e-9)
    assert "layers" not in acdc_overhead.main([*argv, "--threads", "1", "--out", str(tmp_path / "no.json")])


def test_acdc_overhead_ab_runs_the_two_versions_in_turn_and_keeps_each_run(tmp_path: Path) -> None:
    repo = BENCHMARKS.parent
    if not (repo / ".git").exists():
        pytest.skip("needs the git repository (the 'before' version comes from a worktree)")
    script = ["bash", str(BENCHMARKS / "acdc_overhead_ab.sh")]
    tiny = ["--backbones", "conv4", "--image-size", "16", "--batch", "2", "--rounds", "1", "--warmup", "0"]
    worktrees = subprocess.run(["git", "-C", str(repo), "worktree", "list"], capture_output=True, text=True).stdout
    out = tmp_path / "ab"
    run = subprocess.run([*script, "HEAD", str(out), "2", *tiny], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["after_1.json", "after_2.json", "before_1.json", "before_2.json"]
    order = [line.split()[:2] for line in run.stdout.splitlines() if " conv4 b2: " in line]
    assert order == [["before", "1"], ["after", "1"], ["before", "2"], ["after", "2"]]
    assert json.loads((out / "before_2.json").read_text())["backbones"]["conv4"]["2"]["ratio"] > 0
    after = subprocess.run(["git", "-C", str(repo), "worktree", "list"], capture_output=True, text=True).stdout
    assert after == worktrees  # the temporary worktree is gone
    refused = tmp_path / "refused"
    for args, message in [
        (["no-such-commit", str(refused), "1"], "BEFORE 'no-such-commit' is not a commit"),
        (["HEAD", str(refused), "0"], "RUNS must be a whole number >= 1, got '0'"),
        (["HEAD", str(out), "1"], f"OUT_DIR {out} exists and is not empty"),
    ]:
        bad = subprocess.run([*script, *args, *tiny], capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and message in bad.stderr
    assert not refused.exists()


def test_acdc_overhead_scope_layer_gives_every_conv_its_own_coefficients(tmp_path: Path) -> None:
    acdc_overhead = load("acdc_overhead")
    tiny = [
        "--backbones",
        "conv4",
        "--batch",
        "2",
        "--image-size",
        "16",
        "--rounds",
        "1",
        "--warmup",
        "0",
        "--threads",
        "1",
    ]
    net = acdc_overhead.main([*tiny, "--out", str(tmp_path / "net.json")])["backbones"]["conv4"]["2"]
    result = acdc_overhead.main([*tiny, "--scope", "layer", "--out", str(tmp_path / "layer.json")])
    layer = result["backbones"]["conv4"]["2"]
    assert result["settings"]["acdc"] == "layer"
    assert layer["parameters"]["dense"] == net["parameters"]["dense"]
    # conv4 at width 64, m=8: net holds one 64x64x8 A (+ the first layer's 64x3 corner lives inside it);
    # layer holds 3x64x64x8 + 64x3x8 coefficients instead
    assert layer["parameters"]["acdc"] - net["parameters"]["acdc"] == 2 * 64 * 64 * 8 + 64 * 3 * 8


# ------------------------------------------------------------------------------------------------ compare_methods
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _fake_result(accuracy: float, steps: int = 7) -> dict:
    """What a run's result.json holds, as far as compare_methods reads it."""
    return {
        "acdc": "none",
        "split": "test",
        "test_seed": 0,
        "episodes": 600,
        "accuracy_mean": accuracy,
        "accuracy_ci95": 0.5,
        "parameters": 1000,
        "train_seconds": 150.2,
        "stopped_by": "train_seconds",
        "meta_steps": steps,
        "best_step": steps,
        "seconds": 170.0,
        "episode_accuracies": [accuracy],
    }


def _fake_payload() -> dict:
    """Two methods x {dense, ACDC-net} x {1, 5}-shot, one cell missing."""
    records = {}
    for m, method in enumerate(("protonet", "baseline")):
        for v, variant in enumerate(("dense", "acdc-net")):
            for shots in (1, 5):
                if (method, variant, shots) == ("baseline", "acdc-net", 5):
                    continue
                records[f"{method}/{variant}/{shots}shot"] = {
                    "method": method,
                    "variant": variant,
                    "shots": shots,
                    "accuracy_mean": 40.0 + 10 * m + v + shots,
                    "accuracy_ci95": 0.25 + v,
                    "parameters": 2000 - 1000 * v,
                    "train_seconds": 150.3,
                    "steps": 100 + shots,
                    "steps_unit": "batches" if method == "baseline" else "meta-steps",
                    "epochs": 3 if method == "baseline" else None,
                }
    settings = {
        "train_seconds": 150.0,
        "test_episodes": 600,
        "test_seed": 0,
        "seed": 0,
        "backbone": "conv4",
        "width": 32,
        "stem": None,
        "atoms": 8,
        "ways": 5,
        "device": "cpu",
        "threads": 1,
        "jobs": 2,
    }
    return {"settings": settings, "records": records, "commands": ["python benchmarks/compare_methods.py"]}


def test_compare_methods_report_of_a_fake_result_set(tmp_path: Path) -> None:
    compare_methods = load("compare_methods")
    path = tmp_path / "compare_methods.json"
    compare_methods.write_report(_fake_payload(), path)
    text = path.with_suffix(".md").read_text()
    assert "**Budget: 150 s of training per run**" in text and "600 seeded 5-way test episodes" in text
    assert "2 run(s) at a time, each on 1 thread(s)" in text
    tables = [line for line in text.splitlines() if line.startswith("|")]
    assert tables[0] == "| method | 1-shot dense | 1-shot ACDC-net | 5-shot dense | 5-shot ACDC-net |"
    assert tables[2] == "| protonet | 41.00 ± 0.25 | 42.00 ± 1.25 | 45.00 ± 0.25 | 46.00 ± 1.25 |"
    assert tables[3] == "| baseline | 51.00 ± 0.25 | 52.00 ± 1.25 | 55.00 ± 0.25 | not run |"
    assert (
        tables[6] == "| protonet | 101 meta-steps in 150.3 s | 101 meta-steps in 150.3 s | "
        "105 meta-steps in 150.3 s | 105 meta-steps in 150.3 s |"
    )
    assert tables[7].startswith("| baseline | 101 batches, 3 epochs in 150.3 s |") and tables[7].endswith("| – |")
    assert len(tables) == 8
    assert "Backbone parameters: ACDC-net 1,000, dense 2,000." in text
    assert path.with_suffix(".png").read_bytes()[:8] == PNG_MAGIC
    assert json.loads(path.read_text())["records"] == _fake_payload()["records"]


def test_compare_methods_skips_cells_already_in_the_json(tmp_path: Path, monkeypatch) -> None:
    compare_methods = load("compare_methods")
    calls: list[str] = []

    def fake_run(settings, run_dir, threads):
        calls.append(f"{settings['method']}/{settings['acdc']}/{settings['shots']}")
        return _fake_result(30.0 + len(calls))

    monkeypatch.setattr(compare_methods, "run_cell", fake_run)
    out = tmp_path / "cm.json"
    argv = [
        "--quick",
        "--methods",
        "protonet",
        "baseline",
        "--variants",
        "dense",
        "--shots",
        "1",
        "--jobs",
        "1",  # one at a time: the order of the runs is part of what is checked
        "--runs",
        str(tmp_path / "runs"),
        "--out",
        str(out),
    ]
    args = compare_methods.parse(argv)
    present = compare_methods.cell_record(
        _fake_result(77.0),
        "protonet",
        "dense",
        1,
        compare_methods.cell_settings(args, "protonet", "dense", 1),
        1.0,
        None,
    )
    compare_methods.write_json(
        out, {"settings": compare_methods.shared_settings(args), "records": {"protonet/dense/1shot": present}}
    )
    payload = compare_methods.main(argv)
    assert calls == ["baseline/none/1"]  # protonet was there
    assert payload["records"]["protonet/dense/1shot"]["accuracy_mean"] == 77.0
    assert payload["records"]["baseline/dense/1shot"]["steps_unit"] == "batches"
    compare_methods.main(argv)  # everything measured: nothing runs
    assert calls == ["baseline/none/1"]
    compare_methods.main([*argv, "--shots", "1", "5"])  # the 5-shot cells are new
    assert calls == ["baseline/none/1", "protonet/none/5", "baseline/none/5"]
    assert "| baseline | 31.00 ± 0.50 | 33.00 ± 0.50 |" in out.with_suffix(".md").read_text()


def test_compare_methods_refuses_records_measured_otherwise(tmp_path: Path, monkeypatch, capsys) -> None:
    compare_methods = load("compare_methods")
    monkeypatch.setattr(compare_methods, "run_cell", lambda settings, run_dir, threads: _fake_result(50.0))
    out = tmp_path / "cm.json"
    argv = [
        "--quick",
        "--methods",
        "protonet",
        "--variants",
        "dense",
        "--shots",
        "1",
        "--out",
        str(out),
        "--runs",
        str(tmp_path / "runs"),
    ]
    compare_methods.main(argv)
    for extra, message in (
        (["--train-seconds", "3"], "was measured with train_seconds = 2.0, not 3.0"),
        (["--train-seconds", "0"], "--train-seconds must be a positive number of seconds"),
        (["--shots", "0"], "--shots must be >= 1, got 0"),
    ):
        with pytest.raises(SystemExit) as exc:
            compare_methods.main([*argv, *extra])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1
    record = json.loads(out.read_text())
    record["records"]["protonet/dense/1shot"]["settings"]["lr"] = 0.1  # METHOD_SETTINGS changed since
    compare_methods.write_json(out, record)
    with pytest.raises(SystemExit):
        compare_methods.main(argv)
    assert "holds protonet/dense/1shot measured with other settings" in capsys.readouterr().err


def test_compare_methods_cell_settings_share_the_test_and_take_maml_from_its_config() -> None:
    compare_methods = load("compare_methods")
    args = compare_methods.parse([])
    config = compare_methods.maml_config(compare_methods.MAML_CONFIG)
    cells = compare_methods.comparison_cells(args)
    assert len(cells) == 24
    shared = {
        "dataset": "glyphs",
        "backbone": "conv4",
        "width": 32,
        "ways": 5,
        "test_queries": 15,
        "test_split": "test",
        "test_seed": 0,
        "test_episodes": 600,
        "train_seconds": 300.0,
    }
    assert args.jobs == 2 and args.threads == 1
    for key, (method, variant, shots, settings) in cells.items():
        # Chen et al.'s RelationNet runs on their Conv4 that pools in the first two blocks only
        expected = {**shared, "backbone": "conv4_nopool"} if method == "relationnet" else shared
        assert {k: settings[k] for k in shared} == expected, key
        assert settings["shots"] == shots and settings["acdc"] == compare_methods.VARIANTS[variant]
        assert "stem" not in settings and "out" not in settings
    maml = cells["maml/acdc-net/5shot"][3]
    tuned = {k: v for k, v in config.items() if k not in compare_methods.MAML_DROPPED and k != "eval_batch"}
    assert tuned and {k: maml[k] for k in tuned} == tuned  # at its tuned strength
    assert maml["atoms"] == config.get("atoms", 8) and maml["train_episodes"] == compare_methods.EPISODE_CAP
    baseline = cells["baseline/dense/1shot"][3]
    assert baseline["pretrain_epochs"] >= 100 and "train_episodes" not in baseline  # the budget stops it
    tuning = compare_methods.tuning_cells(args)
    assert not any(key.startswith("maml/") for key in tuning)
    splits = {(s["test_split"], s["test_seed"], s["shots"], s["acdc"]) for *_, s in tuning.values()}
    assert splits == {("val", 100, 1, "net")}  # the validation split, on the ACDC-net 1-shot cell


def test_compare_methods_tune_records_candidates_and_the_winners(tmp_path: Path, monkeypatch) -> None:
    compare_methods = load("compare_methods")
    seen: list[dict] = []

    def fake_run(settings, run_dir, threads):
        seen.append(dict(settings))
        # the larger learning rate wins; training on more ways than tested costs a point
        return _fake_result(50.0 + 10 * settings["lr"] * 100 - ("train_ways" in settings))

    monkeypatch.setattr(compare_methods, "run_cell", fake_run)
    out = tmp_path / "tuning.json"
    argv = ["--tune", "--quick", "--methods", "protonet", "maml", "--tune-out", str(out), "--runs", str(tmp_path)]
    payload = compare_methods.main(argv)
    assert len(seen) == len(compare_methods.TUNE_CANDIDATES["protonet"]) == len(payload["records"])
    assert all(s["test_split"] == "val" and s["test_seed"] == 100 for s in seen)
    chosen = json.loads(out.read_text())["chosen"]["protonet"]
    assert chosen["candidate"] == "adam3e-3" and chosen["settings"]["lr"] == 3e-3
    compare_methods.main(argv)  # every candidate measured: none runs again
    assert len(seen) == len(compare_methods.TUNE_CANDIDATES["protonet"])


def test_compare_methods_jobs_run_cells_side_by_side_and_keep_every_record(tmp_path: Path, monkeypatch) -> None:
    import threading

    compare_methods = load("compare_methods")
    both_running = threading.Barrier(2, timeout=20)  # broken (an error) unless two runs overlap

    def fake_run(settings, run_dir, threads):
        both_running.wait()
        return _fake_result(60.0 + settings["shots"])

    monkeypatch.setattr(compare_methods, "run_cell", fake_run)
    out = tmp_path / "compare.json"
    argv = ["--quick", "--methods", "protonet", "--variants", "dense", "--shots", "1", "5", "--jobs", "2"]
    compare_methods.main([*argv, "--runs", str(tmp_path), "--out", str(out)])
    records = json.loads(out.read_text())["records"]
    assert sorted(records) == ["protonet/dense/1shot", "protonet/dense/5shot"]
    assert [records[k]["accuracy_mean"] for k in sorted(records)] == [61.0, 65.0]
    assert json.loads(out.read_text())["settings"]["jobs"] == 2


def test_compare_methods_quick_smoke_one_cell_end_to_end(tmp_path: Path) -> None:
    compare_methods = load("compare_methods")
    out = tmp_path / "compare_methods.json"
    compare_methods.main(
        [
            "--quick",
            "--methods",
            "baseline",
            "--variants",
            "acdc-net",
            "--shots",
            "1",
            "--runs",
            str(tmp_path / "runs"),
            "--out",
            str(out),
        ]
    )
    payload = json.loads(out.read_text())
    (record,) = payload["records"].values()
    assert (record["method"], record["variant"], record["shots"], record["acdc"]) == ("baseline", "acdc-net", 1, "net")
    assert record["episodes"] == 10 and record["split"] == "test" and record["test_seed"] == 0
    assert record["stopped_by"] == "train_seconds" and record["steps"] > 0 and record["train_seconds"] >= 2.0
    assert record["settings"]["train_seconds"] == 2.0 and record["parameters"] > 0
    assert "| baseline | not run |" not in out.with_suffix(".md").read_text()
    assert "| baseline | " in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").read_bytes()[:8] == PNG_MAGIC


# ------------------------------------------------------------------------------------------------ cuda.sh
def test_cuda_script_commands_parse() -> None:
    """Every benchmark command of the prepared GPU script is accepted by that script's parser."""
    import shlex

    text = (BENCHMARKS / "cuda.sh").read_text().replace("\\\n", " ")
    lines = [line[line.index("python benchmarks/") :] for line in text.splitlines() if "python benchmarks/" in line]
    commands = [shlex.split(line.split("; fi")[0])[1:] for line in lines]
    assert [Path(c[0]).stem for c in commands] == ["maml_step", "evaluate", "acdc_overhead", "torchrun_scaling"]
    for script, *argv in commands:
        args = load(Path(script).stem).parse([a.replace("$dest", "/tmp").replace("$gpus", "2") for a in argv])
        assert args.device == "cuda"
        assert args.out.startswith("/tmp/")


# ------------------------------------------------------------------------------------------------ profile_step
def test_profile_step_reports_convolution_share(tmp_path: Path) -> None:
    profile_step = load("profile_step")
    result = profile_step.main(
        TINY_STEP
        + ["--configs", "conv4-dense-first", "--contenders", "ours", "higher", "--out", str(tmp_path / "p.json")]
    )
    row = result["configs"]["conv4-dense-first"]
    assert set(row) == {"ours", "higher"}
    for contender in row.values():
        assert 0 < contender["convolution_ms"] < contender["self_cpu_ms"]
        rounding = 0.1 / contender["self_cpu_ms"]  # the times are rounded to 0.1 ms, the share is not
        assert contender["convolution_share"] == pytest.approx(
            contender["convolution_ms"] / contender["self_cpu_ms"], abs=rounding + 1e-4
        )
        assert "aten::convolution_backward" in contender["top_ops_ms"]
    assert json.loads((tmp_path / "p.json").read_text())["configs"] == json.loads(json.dumps(result["configs"]))


# ------------------------------------------------------------------------------------------------ pretrain_throughput
def test_pretrain_throughput_smoke(tmp_path: Path) -> None:
    pretrain = load("pretrain_throughput")
    out = tmp_path / "throughput.json"
    result = pretrain.main(
        [
            "--quick",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--variants",
            "dense",
            "acdc-net",
            "--amp",
            "none",
            "--steps",
            "1",
            "--batch-size",
            "2",
            "--out",
            str(out),
        ]
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["command"].startswith("python benchmarks/pretrain_throughput.py --quick")
    assert [(r["variant"], r["precision"]) for r in result["results"]] == [("dense", "off"), ("acdc-net", "off")]
    dense, acdc = result["results"]
    assert dense["parameters"] == 11_173_962 and acdc["parameters"] < dense["parameters"] / 4
    assert acdc["relative_to_dense"] == pytest.approx(acdc["images_per_second"] / dense["images_per_second"])
    assert dense["relative_to_dense"] == 1.0


@pytest.mark.parametrize("flag", ["--batch-size", "--steps", "--repeats"])
def test_pretrain_throughput_refuses_zero(flag: str) -> None:
    pretrain = load("pretrain_throughput")
    with pytest.raises(ValueError, match=f"{flag} must be >= 1, got 0"):
        pretrain.parse(["--quick", flag, "0"])


def _tiny_maml_config(tmp_path: Path) -> Path:
    """A main-job-like config small enough for a test (conv4 width 4, 2 inner steps)."""
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "dataset: glyphs\nbackbone: conv4\nwidth: 4\nacdc: net\natoms: 4\nways: 5\nshots: 1\nqueries: 2\n"
        "meta_batch: 2\nlr: 0.001\ninner_steps: 2\ninner_lr: 0.1\ntest_inner_steps: 2\nfirst_order: true\n"
        "val_every: 0\nval_episodes: 2\neval_batch: 2\ntrain_seconds: 100\nout: runs/ignored\n"
    )
    return config


def test_depth_sweep_runs_cells_end_to_end_and_skips_measured_ones(tmp_path) -> None:
    depth_sweep = load("depth_sweep")
    out = tmp_path / "sweep.json"
    argv = [
        "--config",
        str(_tiny_maml_config(tmp_path)),
        "--backbones",
        "conv4",
        "resnet10",
        "--shots",
        "1",
        "--seeds",
        "0",
        "--train-episodes",
        "4",
        "--test-episodes",
        "3",
        "--resnet-width",
        "2",
        "--threads",
        "1",
        "--runs",
        str(tmp_path / "runs"),
        "--out",
        str(out),
    ]
    depth_sweep.main(argv)
    payload = json.loads(out.read_text())
    assert sorted(payload["records"]) == [
        "conv4/net/1shot/seed0",
        "conv4/none/1shot/seed0",
        "resnet10/net/1shot/seed0",
        "resnet10/none/1shot/seed0",
    ]
    cell = payload["records"]["resnet10/net/1shot/seed0"]
    assert cell["settings"]["width"] == 2 and cell["settings"]["stem"] == "small"
    assert cell["settings"]["train_episodes"] == 4 and "train_seconds" not in cell["settings"]
    assert cell["meta_steps"] == 2 and cell["episodes"] == 3  # 4 episodes in meta-batches of 2
    dense = payload["records"]["resnet10/none/1shot/seed0"]
    assert dense["parameters"] > cell["parameters"]
    table = (tmp_path / "sweep.md").read_text()
    assert "| resnet10 |" in table and "(1 seed)" in table
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A second run finds every cell measured and runs none (the record is left as it was).
    before = out.read_text()
    depth_sweep.main(argv)
    assert json.loads(out.read_text())["records"] == json.loads(before)["records"]


def test_depth_sweep_jobs_run_cells_side_by_side(tmp_path, monkeypatch) -> None:
    import threading

    depth_sweep = load("depth_sweep")
    both_running = threading.Barrier(2, timeout=20)  # broken (an error) unless two cells overlap

    def fake_run(script, settings, run_dir, threads):
        both_running.wait()
        cell = {k: settings[k] for k in ("backbone", "acdc", "shots", "seed")}
        return {**cell, "accuracy_mean": 70.0 + len(settings["acdc"]), "accuracy_ci95": 1.0, "episodes": 600}

    monkeypatch.setattr(depth_sweep, "run_fewshot_cli", fake_run)
    out = tmp_path / "sweep.json"
    depth_sweep.main(
        [
            "--backbones",
            "conv4",
            "--shots",
            "1",
            "--seeds",
            "0",
            "--jobs",
            "2",
            "--out",
            str(out),
            "--runs",
            str(tmp_path / "runs"),
        ]
    )
    records = json.loads(out.read_text())["records"]
    assert {k: (r["accuracy_mean"], r["jobs"], r["threads"]) for k, r in records.items()} == {
        "conv4/net/1shot/seed0": (73.0, 2, 1),
        "conv4/none/1shot/seed0": (74.0, 2, 1),
    }


def test_depth_sweep_summary_is_mean_and_std_across_seeds() -> None:
    depth_sweep = load("depth_sweep")
    records = {
        f"resnet10/net/1shot/seed{s}": {"backbone": "resnet10", "acdc": "net", "shots": 1, "accuracy_mean": acc}
        for s, acc in enumerate([50.0, 54.0, 58.0])
    }
    (row,) = depth_sweep.summarize(records)
    assert row["seeds"] == 3 and row["mean"] == pytest.approx(54.0) and row["std"] == pytest.approx(4.0)


def test_tune_glyphs_stage_winners_build_the_next_base() -> None:
    tune = load("tune_glyphs")
    records = {}
    for index, stage in enumerate(tune.STAGES[:2], start=1):
        for rank, name in enumerate(stage.candidates):
            records[f"{index}/{name}"] = {"val_accuracy": 50.0 + rank}  # the last candidate wins
    settings = tune.best_settings(records, 2)
    last = [list(stage.candidates.values())[-1] for stage in tune.STAGES[:2]]
    expected = {**tune.BASE, **last[0], **last[1]}
    assert settings == expected
    with pytest.raises(RuntimeError, match="stage 3 .* is not complete"):
        tune.best_settings(records, 3)


def test_tune_glyphs_reuses_a_run_of_the_same_settings_and_budget(tmp_path, monkeypatch) -> None:
    tune = load("tune_glyphs")
    out = tmp_path / "tune.json"
    stage1 = tune.STAGES[0]
    records = {}
    for rank, (name, overrides) in enumerate(stage1.candidates.items()):
        records[f"1/{name}"] = {
            "settings": {**tune.BASE, **overrides},
            "train_episodes": 30,
            "val_accuracy": 60.0 - rank,
            "val_ci95": 1.0,
            "best_step": 1,
            "train_seconds": 1.0,
        }  # the first candidate (BASE) wins
    out.write_text(json.dumps({"records": records, "stages": {}, "episodes": 30, "val_episodes": 5, "seed": 0}))
    calls = []

    def fake_run(settings, episodes, run_dir, args):
        calls.append((settings["inner_lr"], episodes))
        return {
            "settings": dict(settings),
            "train_episodes": episodes,
            "val_accuracy": 50.0,
            "val_ci95": 1.0,
            "meta_steps": 1,
            "train_seconds": 1.0,
            "best_step": 1,
        }

    monkeypatch.setattr(tune, "run_candidate", fake_run)
    tune.main(
        [
            "--stages",
            "2",
            "--episodes",
            "30",
            "--val-episodes",
            "5",
            "--jobs",
            "1",
            "--runs",
            str(tmp_path / "runs"),
            "--out",
            str(out),
        ]
    )
    payload = json.loads(out.read_text())
    first, second = list(tune.STAGES[1].candidates)
    assert calls == [(tune.STAGES[1].candidates[second]["inner_lr"], 30)]  # the first candidate is stage 1's winner
    assert payload["records"][f"2/{first}"]["reused_from"] == "1/conv4-w32"
    assert payload["records"][f"2/{first}"]["val_accuracy"] == 60.0
    assert "| 2 | inner step size |" in (tmp_path / "tune.md").read_text()


def test_compare_methods_settings_are_the_committed_search_winners() -> None:
    """METHOD_SETTINGS must be what benchmarks/results/compare_methods_tuning.json chose (copied by hand)."""
    compare_methods = load("compare_methods")
    payload = json.loads((BENCHMARKS / "results" / "compare_methods_tuning.json").read_text())
    assert payload["settings"]["train_seconds"] == compare_methods.parse([]).train_seconds
    assert set(payload["chosen"]) == set(compare_methods.METHOD_SETTINGS) - {"maml"}
    for method, choice in payload["chosen"].items():
        assert compare_methods.METHOD_SETTINGS[method] == choice["settings"], method
        assert (
            choice["settings"]["train_ways"] == 20 if method == "protonet" else "train_ways" not in choice["settings"]
        )


# ------------------------------------------------------------------------------------------------ torchrun_scaling
def test_torchrun_scaling_smoke_records_train_and_test_seconds(tmp_path: Path) -> None:
    out = tmp_path / "scaling.json"
    argv = ["--processes", "1", "--rounds", "1", "--meta-steps", "1", "--test-episodes", "3", "--out", str(out)]
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "torchrun_scaling.py"), *argv],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    payload = json.loads(out.read_text())
    (run,) = payload["runs"]["1"]
    assert run["meta_steps"] == 1 and run["train_seconds"] > 0 and run["test_seconds"] > 0
    assert payload["speedup_over_fewest"]["1"] == {"train_seconds": 1.0, "test_seconds": 1.0}
    with pytest.raises(SystemExit):
        load("torchrun_scaling").parse(["--processes", "0"])
