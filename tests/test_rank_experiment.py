"""The LoRA paper's r 8 vs r 64 experiment on a tiny-model training, from one command."""

import json

from PIL import Image

from app.cli import main
from trainer.demo.demo_data import make_demo_dataset


def test_rank_experiment_trains_both_ranks_and_saves_the_heatmap(tmp_path, capsys):
    make_demo_dataset(tmp_path / "data", count=4, seed=5)
    out = tmp_path / "exp"
    code = main(["lora", "rank-experiment", "--data", str(tmp_path / "data"), "--output", str(out),
                 "--steps", "2", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert (out / "r8" / "demo-lora.safetensors").is_file() and (out / "r64" / "demo-lora.safetensors").is_file()
    heatmap = Image.open(out / "similarity.png")
    assert heatmap.width > 0 and heatmap.height > 0
    mean = report["mean"]
    assert len(mean) == 8  # i runs over the r 8 subspace
    assert all(0.0 <= value <= 1.0 + 1e-6 for row in mean for value in row)
