"""The benchmark harness runs and reports every figure and ratio, so it cannot rot between bench runs.

Tiny models, a handful of images, 1-2 steps: the numbers mean nothing here, only their presence does.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import end_to_end, gpu, harness, train_step

pytest.importorskip("peft")
pytest.importorskip("lycoris")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def bench_work(tmp_path_factory, monkeypatch):
    # Models and data are shared by the tests of this module; nothing lands in the repo's bench/.work.
    monkeypatch.setenv("SDLORA_BENCH_WORK", str(tmp_path_factory.getbasetemp() / "bench-work"))


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_train_step_reports_every_contender_and_ratio(tmp_path):
    out = tmp_path / "train_step.json"
    assert train_step.main(["--models", "tiny", "--steps", "1", "--warmup", "0", "--repeats", "1", "--images", "4",
                            "--pair-repeats", "1", "--pair-steps", "1",
                            "--in-process", "--no-static", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {"date", "cpu", "cores", "versions"} <= set(result["machine"])
    summary = result["models"]["tiny"]
    assert set(summary["contenders"]) == set(train_step.DEFAULT_CONTENDERS["tiny"])
    for name, c in summary["contenders"].items():
        for key in ("median_step_s", "median_cpu_step_s", "images_per_s", "peak_rss_mib", "setup_s",
                    "trainable_params", "adapted_modules"):
            assert positive(c[key]), (name, key, c[key])
        assert positive(c["export"]["bytes"]) and c["export"]["ratio_to_params_x_bytes"] >= 1.0
        assert c["loss_finite"]
    ratios = {(r["ours"], r["peer"]): r for r in summary["ratios"]}
    assert set(ratios) == {("sdlora", "diffusers-peft"), ("sdlora-locon", "lycoris-locon"),
                           ("sdlora", "diffusers-peft-cached")}
    for r in ratios.values():
        for key in ("step_time", "cpu_step_time", "step_time_of_medians", "images_per_s", "peak_rss"):
            assert positive(r[key]), (r["ours"], r["peer"], key)
        assert r["same_adapted_modules"] and r["same_trainable_params"]
    assert ratios[("sdlora", "diffusers-peft")]["targets"]["step_time"]["max"] == 0.9


def test_a_contender_runs_in_its_own_process(tmp_path):
    spec = train_step.base_spec(train_step.parse_args(["--steps", "1", "--warmup", "0", "--images", "4"]), "tiny")
    result = harness.run_worker(dict(spec, contender="sdlora", tree=None))
    assert positive(result["median_step_s"]) and positive(result["peak_rss_mib"])
    assert positive(result["process_wall_s"]) and positive(result["polled_vmhwm_mib"])


def test_gpu_mode_code_path_runs_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    assert gpu.main(["--device", "cpu", "--configs", "tiny-64-bs1-no-gc", "--steps", "1", "--warmup", "0",
                     "--images", "4", "--in-process", "--out", str(out)]) == 0
    config = json.loads(out.read_text())["configs"]["tiny-64-bs1-no-gc"]
    assert config["settings"]["gradient_checkpointing"] is True
    for c in config["contenders"].values():
        assert positive(c["achieved_tflops"]) and positive(c["useful_tflop_per_image"])
    assert positive(config["ratios"][0]["step_time"])


def test_gpu_config_names():
    assert gpu.parse_config("sd15-512-bs8-bf16") == {"name": "sd15-512-bs8-bf16", "model": "sd15", "resolution": 512,
                                                     "batch_size": 8, "mixed_precision": "bf16",
                                                     "gradient_checkpointing": False}
    assert gpu.parse_config("sd15-512-bs1-bf16-gc")["gradient_checkpointing"] is True
    with pytest.raises(SystemExit, match=r"is not MODEL-RES-bsN-PRECISION\[-gc\]"):
        gpu.parse_config("sd15-512-bs1-bf16-xx")


def test_sd15_step_flops_match_the_published_estimate():
    flops = gpu.step_flops_per_image("sd15", 512)
    assert flops == pytest.approx(1.73e12, rel=0.01)


def test_interleaving_keeps_pairs_adjacent_and_alternates_who_goes_first():
    groups = [["a", "b", "c"], ["x", "y"]]
    assert harness.interleaved_order(groups, 0) == ["a", "b", "c", "x", "y"]
    assert harness.interleaved_order(groups, 1) == ["y", "x", "c", "b", "a"]


def test_end_to_end_commands_and_ratios(tmp_path):
    args = end_to_end.parse_args(["--models", "tiny"])
    sdlora = end_to_end.command("sdlora", args, tmp_path / "m", tmp_path / "d", tmp_path / "r")
    assert sdlora[-2:] != [] and "train" in sdlora and "train.epochs=10" in sdlora
    peer = end_to_end.command("lycoris-locon", args, tmp_path / "m", tmp_path / "d", tmp_path / "r")
    assert peer[1:3] == ["-m", "bench.peers"] and "lycoris" in peer
    fake = {"bytes": 10, "params": 4, "modules": 1, "bytes_per_param": 2, "ratio_to_params_x_bytes": 1.25}
    runs = {name: [{"wall_s": w, "cpu_s": w, "peak_rss_mib": 100.0 * w, "file": fake}]
            for name, w in (("sdlora", 1.0), ("diffusers-peft", 2.0), ("sdlora-locon", 3.0), ("lycoris-locon", 4.0))}
    summary = end_to_end.summarize(runs)
    assert [(r["ours"], r["peer"]) for r in summary["ratios"]] == [("sdlora", "diffusers-peft"),
                                                                   ("sdlora-locon", "lycoris-locon")]
    assert summary["ratios"][0]["wall_time"] == 0.5 and summary["ratios"][0]["targets"]["wall_time"]["met"]


def test_quality_steps_to_reach_and_ratios():
    from bench.quality import Setting, ratio_lines, steps_to_reach

    curve = [(0, 10.0, 90.0), (10, 30.0, 90.0), (20, 70.0, 85.0)]
    assert steps_to_reach(curve, 50.0) == 15.0  # interpolated between steps 10 and 20
    assert steps_to_reach(curve, 10.0) == 0 and steps_to_reach(curve, 80.0) is None
    ours = Setting("sdlora r8, recipe modules", "head-to-head", "sdlora", curve=curve)
    theirs = Setting("recipe r8", "head-to-head", "recipe", curve=[(0, 10.0, 90.0), (20, 30.0, 90.0),
                                                                    (40, 50.0, 90.0)])
    assert ratio_lines([ours, theirs], 50.0, 40) == ["sdlora r8, recipe modules / recipe r8: 0.38"]
    never = Setting("recipe r8", "head-to-head", "recipe", curve=[(0, 10.0, 90.0), (40, 20.0, 90.0)])
    assert ratio_lines([ours, never], 50.0, 40) == [
        "sdlora r8, recipe modules / recipe r8: < 0.38 (recipe never reached it in 40 steps)"]


def test_quality_bench_prints_the_table_and_the_ratio(tmp_path):
    env = dict(os.environ, SDLORA_BENCH_WORK=str(tmp_path / "work"))
    result = subprocess.run([sys.executable, "-m", "bench.quality", "--steps", "4", "--every", "2", "--seeds", "1",
                             "--only", "head-to-head", "--out", str(tmp_path / "quality.json"),
                             "--plots", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "base model: style" in result.stdout and "steps to style" in result.stdout
    assert "sdlora r8, recipe modules / recipe r8: " in result.stdout
    saved = json.loads((tmp_path / "quality.json").read_text())
    assert [len(s["curve"]) for s in saved["settings"]] == [3, 3, 3]  # steps 0, 2, 4 for each contender
    assert all(0 <= point[1] <= 100 and 0 <= point[2] <= 100 for s in saved["settings"] for point in s["curve"])


def contestant(name, curves, params=1000, size=2048, overrides=None):
    from bench.compare_types import Contestant

    return [Contestant(name, seed, overrides or {}, curve=curve, untriggered={"style": 4.0, "content": 80.0, "change": 3.0},
                       trainable_params=params, file_bytes=size) for seed, curve in zip((42, 43), curves)]


def test_compare_types_tables_average_the_seeds_and_measure_against_the_full_fine_tune():
    from bench.compare_types import ninety_percent_level, type_rows

    full = contestant("full", [[(0, 10.0, 80.0), (10, 40.0, 80.0), (20, 50.0, 70.0)],
                               [(0, 10.0, 80.0), (10, 50.0, 80.0), (20, 70.0, 90.0)]], params=5000,
                      overrides={"train": {"learning_rate": 1e-4}})
    lora = contestant("lora", [[(0, 10.0, 80.0), (10, 60.0, 75.0), (20, 66.0, 75.0)],
                               [(0, 10.0, 80.0), (10, 40.0, 85.0), (20, 60.0, 85.0)]])
    # full fine-tune's final style, mean of its seeds: 60; 90% of the gain from 10 is 55
    assert ninety_percent_level(full + lora, 10.0) == pytest.approx(55.0)
    header, rows = type_rows(full + lora, 10.0)
    assert header[5] == "steps to style 55.0 (90% of full FT)" and len(header) == len(rows[0]) == 8
    assert rows[0][:5] == ["full", "0.0001", "10 / 45 / 60", "80 / 80 / 80", "50.0, 70.0"]
    assert rows[0][5] == "17"  # its mean curve: 45 at step 10, 60 at step 20, so 55 at step 16.7
    assert rows[1][1:3] == ["0.002", "10 / 50 / 63"]  # the demo preset's rate
    assert rows[1][5] == "14" and rows[1][6:] == [1000, "2"]
    assert type_rows(lora, 10.0)[1][0][5] == "n/a"  # no full fine-tune, no yardstick


def test_compare_types_runs_each_type_and_the_full_fine_tune(tmp_path, capsys):
    """A tiny run of the comparison: one row per contestant, and the full fine-tune trains every UNet weight."""
    from bench import compare_types
    from trainer.model.model_loading import load_model

    out, figure = tmp_path / "types.json", tmp_path / "types.png"
    assert compare_types.main(["--types", "lora", "full", "--steps", "2", "--every", "2", "--training-seeds", "1",
                               "--score-seeds", "1", "--sampler-steps", "2", "--no-preservation", "--out", str(out),
                               "--plot", str(figure)]) == 0
    result = json.loads(out.read_text())
    header, rows = result["types_table"]
    assert header[0] == "contestant" and header[-2:] == ["trainable params", "file KiB"]
    assert [row[0] for row in rows] == ["full", "lora"]  # the yardstick first
    full, lora = rows
    unet_params = sum(p.numel() for p in load_model("demo:shapes").unet.parameters())
    assert full[6] == unet_params and 0 < lora[6] < unet_params / 10
    assert abs(float(full[7]) * 1024 - 2 * unet_params) < 0.01 * 2 * unet_params  # fp16, as the LoRA files
    assert all([point[0] for point in c["curve"]] == [0, 2] for c in result["contestants"])
    kept_header, kept = result["preservation_table"]
    assert [row[0] for row in kept] == ["base model (no adapter)", "full", "lora"] and kept[0][-1] == "0.0"
    assert all(0 <= float(value) <= 100 for row in kept for value in row[1:])
    if importlib.util.find_spec("matplotlib"):  # the `bench` extra; CI installs only `test`
        assert figure.stat().st_size > 10_000
    else:
        assert not figure.exists() and "no plot: matplotlib is missing" in capsys.readouterr().out
