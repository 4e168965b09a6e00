"""The benchmark harness runs and reports every figure and ratio, so it cannot rot between bench runs.

Tiny models, a handful of images, 1-2 steps: the numbers mean nothing here, only their presence does.
"""

import json
import math

import pytest

from bench import end_to_end, gpu, harness, train_step

pytest.importorskip("peft")
pytest.importorskip("lycoris")


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
