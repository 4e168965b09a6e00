"""One trainer per run folder (issue 25): a second `sdlora train` into a live run's --output is refused with one
sentence and leaves the first run alone; a killed trainer's lock never blocks; killed saves' temp files are
cleaned when the next run starts there. Driven through the CLI, as a user would."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.runs import RunManager
from networks.errors import SdloraError
from trainer.demo.demo_data import make_demo_dataset
from trainer.run.run_dir import RunDir

ROOT = Path(__file__).resolve().parents[1]
LOCK_HOLDER = "import sys, time; from pathlib import Path; from trainer.run import lock; " \
              "lock.acquire(Path(sys.argv[1])); print('held', flush=True); time.sleep(60)"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    make_demo_dataset(folder, count=4, seed=0)
    return folder


def train_command(data: Path, out: Path, *overrides: str) -> list[str]:
    # The random tiny SD1 at 64 px: the fastest model the CLI trains.
    settings = ["model.path=demo:sd1", "dataset.resolution=64", "network.rank=4", "sample.every_steps=0",
                "sample.at_start=false", "save.every_steps=0", *overrides]
    return [sys.executable, "-m", "app.cli", "train", "--data", str(data), "--preset", "demo", "--output", str(out),
            "--no-progress", *(arg for setting in settings for arg in ("--set", setting))]


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_second_run_into_a_busy_folder_is_refused_and_a_killed_runs_lock_does_not_block(tmp_path, data):
    out = tmp_path / "run"
    first = subprocess.Popen(train_command(data, out, "train.max_steps=100000"), cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (out / "events.jsonl").is_file() or not any(e["event"] == "step" for e in lines(out / "events.jsonl")):
            assert first.poll() is None and time.time() < deadline, "the first run never took a step"
            time.sleep(0.2)
        config_before = (out / "config.toml").read_text()
        pid_before = (out / "trainer.pid").read_text()

        second = subprocess.run(train_command(data, out, "train.max_steps=3", "train.learning_rate=0.5"), cwd=ROOT,
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 1
        assert second.stderr.strip().splitlines() == [
            f"error: The run folder {out} is in use by another training run (process {first.pid}); wait for it to "
            "finish, stop it, or choose another --output."]
        assert first.poll() is None  # the first run trains on, untouched
        assert (out / "config.toml").read_text() == config_before
        assert (out / "trainer.pid").read_text() == pid_before
        events = lines(out / "events.jsonl")
        assert [e["event"] for e in events].count("started") == 1
        assert all(e["event"] == "step" for e in events[1:])  # no `error` or second run's lines among them
    finally:
        first.kill()  # -9: no clean-up, the lock file stays behind
        first.wait()

    assert (out / "trainer.lock").is_file() and not RunDir(out).busy()
    orphans = [out / ".config.toml.k1ll3d00.tmp", out / "checkpoints" / ".demo-lora-step-000004.safetensors.x9y8z7w6.tmp"]
    for orphan in orphans:
        orphan.write_bytes(b"")  # what a save killed before its rename leaves
    third = subprocess.run(train_command(data, out, "train.max_steps=2"), cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    assert third.returncode == 0, third.stderr[-2000:]
    assert lines(out / "events.jsonl")[-1]["event"] == "finished"
    assert not any(orphan.exists() for orphan in orphans)


def test_the_run_manager_refuses_a_folder_whose_lock_a_live_process_holds(tmp_path):
    manager = RunManager(tmp_path / "runs", trainer_command=["false"])
    run = manager.runs_dir / "elsewhere"
    (run / "state").mkdir(parents=True)
    (run / "config.toml").write_text('name = "elsewhere"\n')
    (run / "events.jsonl").write_text(json.dumps({"event": "stopped", "step": 2, "checkpoint": "c"}) + "\n")
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(RunDir(run).lock_path)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"  # a trainer started from a terminal, no pid file yet
        assert RunDir(run).busy()
        with pytest.raises(SdloraError, match="The run elsewhere is already training."):
            manager.resume(run)
        with pytest.raises(SdloraError, match="The run elsewhere is training; stop it before deleting it."):
            manager.delete(run)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert not RunDir(run).busy()  # the dead process holds nothing
    manager.delete(run)
    assert not run.exists()
