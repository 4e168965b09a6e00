"""The training state's swap: a crash at any point of a save leaves a complete state, and resume takes the
newest complete one (`state`, `state.tmp` or `state.old`), restoring it bit for bit."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

import trainer.run.state as state_module
from networks.errors import SdloraError
from tests.test_training import events, resume_run, tiny_config
from trainer.run.loop import train
from trainer.run.state import Position, is_complete, load_state, newest_complete, save_state


class Parts:
    """A tiny model and optimizer registered with accelerate the way the trainer registers its network."""

    def __init__(self, seed: int = 0):
        torch.manual_seed(seed)
        self.accelerator = Accelerator(cpu=True)
        self.model = torch.nn.Linear(4, 3)
        self.optimizer = self.accelerator.prepare(torch.optim.AdamW(self.model.parameters(), lr=0.1))
        self.accelerator.register_for_checkpointing(self.model)

    def step(self) -> None:
        self.model(torch.randn(2, 4)).sum().backward()
        self.optimizer.step()
        self.optimizer.zero_grad()

    def weights(self) -> dict:
        return {k: v.clone() for k, v in self.model.state_dict().items()}


def saved_after(folder: Path, steps: list[int]) -> tuple[Parts, dict]:
    """Parts stepped and saved after each of `steps`; the weights at the last save."""
    parts = Parts()
    done = 0
    for step in steps:
        while done < step:
            parts.step()
            done += 1
        save_state(parts.accelerator, folder, Position(step=step))
    return parts, parts.weights()


def restored(folder: Path) -> tuple[Position, dict]:
    fresh = Parts(seed=99)
    position = load_state(fresh.accelerator, folder)
    return position, fresh.weights()


def crash_on(monkeypatch, where: str):
    """Make the next save die (as kill -9 would, but inside Python) at `where` of the swap."""
    real_rename, real_rmtree = Path.rename, shutil.rmtree

    def rename(self, target):
        if where == "before_new_in_place" and self.name == "state.tmp":
            raise SystemExit("killed")
        return real_rename(self, target)

    def rmtree(path, *args, **kwargs):
        path = Path(path)
        if where == "before_old_deleted" and path.name == "state.old" and path.with_name("state").exists() \
                and not path.with_name("state.tmp").exists():
            raise SystemExit("killed")
        return real_rmtree(path, *args, **kwargs)

    def position(staging, position):
        raise SystemExit("killed")

    monkeypatch.setattr(Path, "rename", rename)
    monkeypatch.setattr(state_module.shutil, "rmtree", rmtree)
    if where == "while_writing":
        monkeypatch.setattr(state_module, "_write_position", position)


@pytest.mark.parametrize("where, layout, restored_step", [
    ("while_writing", {"state", "state.tmp"}, 1),  # state.tmp without its trainer.json is not complete
    ("before_new_in_place", {"state.old", "state.tmp"}, 2),  # the new state, complete, not yet renamed
    ("before_old_deleted", {"state", "state.old"}, 2),
])
def test_a_crash_anywhere_in_the_swap_resumes_from_the_newest_complete_state(tmp_path, monkeypatch, where, layout,
                                                                           restored_step):
    folder = tmp_path / "state"
    parts, at_one = saved_after(folder, [1])
    parts.step()
    at_two = parts.weights()
    killed_while_saving(monkeypatch, parts, folder, 2, where)
    assert {p.name for p in tmp_path.iterdir()} == layout
    position, weights = restored(folder)
    assert position.step == restored_step
    expected = at_one if restored_step == 1 else at_two
    assert all(torch.equal(weights[k], expected[k]) for k in expected)

def killed_while_saving(monkeypatch, parts, folder: Path, step: int, where: str) -> None:
    """Save the state at `step` and die at `where` of the swap; the patches are gone afterwards."""
    crash_on(monkeypatch, where)
    with pytest.raises(SystemExit):
        save_state(parts.accelerator, folder, Position(step=step))
    monkeypatch.undo()



def test_resume_restores_the_rng_and_optimizer_of_a_state_left_in_state_tmp(tmp_path, monkeypatch):
    folder = tmp_path / "state"
    parts, _ = saved_after(folder, [1])
    parts.step()
    killed_while_saving(monkeypatch, parts, folder, 2, "before_new_in_place")
    parts.step()  # what the run would have done next
    expected, expected_draw = parts.weights(), torch.rand(3)
    fresh = Parts(seed=99)
    assert load_state(fresh.accelerator, folder).step == 2
    fresh.step()
    assert all(torch.equal(fresh.weights()[k], expected[k]) for k in expected)
    assert torch.equal(torch.rand(3), expected_draw)


def test_the_next_save_after_a_crash_never_deletes_the_only_complete_state(tmp_path, monkeypatch):
    """Two kills in a row: first between the renames (only state.old and a complete state.tmp are left),
    then while writing the next state. The newest complete state survives both."""
    folder = tmp_path / "state"
    parts, _ = saved_after(folder, [1])
    parts.step()
    killed_while_saving(monkeypatch, parts, folder, 2, "before_new_in_place")
    at_two = parts.weights()
    resumed = Parts(seed=7)
    assert load_state(resumed.accelerator, folder).step == 2
    killed_while_saving(monkeypatch, resumed, folder, 3, "while_writing")
    assert newest_complete(folder) == folder and not (tmp_path / "state.old").exists()
    position, weights = restored(folder)
    assert position.step == 2 and all(torch.equal(weights[k], at_two[k]) for k in at_two)


def test_a_state_with_a_missing_or_short_file_is_not_complete(tmp_path):
    folder = tmp_path / "state"
    saved_after(folder, [1])
    assert is_complete(folder)
    listed = json.loads((folder / "trainer.json").read_text())["files"]
    assert {"optimizer.bin", "custom_checkpoint_0.pkl"} <= set(listed)
    victim = folder / "optimizer.bin"
    victim.write_bytes(victim.read_bytes()[:-1])
    assert not is_complete(folder)
    victim.unlink()
    assert not is_complete(folder)
    with pytest.raises(SdloraError, match=r"^No saved training state in .*state; the run stopped before its "
                                          r"first checkpoint, so start it again instead of resuming\.$"):
        load_state(Parts().accelerator, folder)


def test_a_state_written_before_files_were_listed_still_resumes(tmp_path):
    folder = tmp_path / "state"
    _, weights = saved_after(folder, [1])
    (folder / "trainer.json").write_text(json.dumps({"step": 1, "epoch": 0, "batch": 1}))  # the old format
    position, restored_weights = restored(folder)
    assert position == Position(step=1, epoch=0, batch=1)
    assert all(torch.equal(restored_weights[k], weights[k]) for k in weights)


def test_a_run_killed_twice_in_the_state_swap_resumes_bit_for_bit(tmp_path, monkeypatch):
    """The issue's reproduction, on a real run: killed between the renames at step 2, resumed, killed while
    writing the step-3 state, resumed again: the final file equals an uninterrupted run's."""
    from trainer.demo.demo_data import make_demo_dataset

    make_demo_dataset(tmp_path / "data", count=4, seed=0)
    flags = ["train.max_steps=4", "train.batch_size=2", "save.every_steps=1", "dataset.flip=true",
             "network.rank_dropout=0.2"]
    train(tiny_config(tmp_path / "data", tmp_path / "straight", *flags), progress=False)

    run = tmp_path / "killed"
    saves = {"n": 0}
    real_position = state_module._write_position

    def kill_at_second_swap(staging, position):
        real_position(staging, position)
        saves["n"] += 1
        if saves["n"] == 2:
            crash_on(monkeypatch, "before_new_in_place")
    monkeypatch.setattr(state_module, "_write_position", kill_at_second_swap)
    with pytest.raises(SystemExit):
        train(tiny_config(tmp_path / "data", run, *flags), progress=False)
    monkeypatch.undo()
    assert {p.name for p in run.iterdir() if p.name.startswith("state")} == {"state.old", "state.tmp"}

    crash_on(monkeypatch, "while_writing")
    with pytest.raises(SystemExit):
        resume_run(run)
    monkeypatch.undo()
    assert json.loads((run / "state" / "trainer.json").read_text())["step"] == 2
    resume_run(run)

    starts = [e["start_step"] for e in events(run) if e["event"] == "started"]
    assert starts == [0, 2, 2]
    straight, resumed = load_file(tmp_path / "straight" / "demo-lora.safetensors"), load_file(run / "demo-lora.safetensors")
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
