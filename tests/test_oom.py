"""GPU memory in a run (trainer/run/gpu_memory.py): a CUDA out-of-memory error in the step ends the run with one
sentence (predicted and available memory, the changes that fit, what is intact), exit 1, an `error` event, the
checkpoints and state untouched and `--resume` working; the watch's warnings as pure functions of bytes and
seconds; the step events' memory fields. None of it needs a GPU: the error is raised by hand, as torch would."""

import json
import sys
import types
from pathlib import Path

import pytest
import torch

import trainer.run.gpu_memory as gm
from app.cli import main
from tests.test_disk_full import assert_resume_finishes, train_args
from trainer.config.presets import resolve_config
from trainer.run.batch_loss import BatchLoss
from trainer.run.events import StepEvent, parse
from trainer.run.run_dir import RunDir

GIB = 2 ** 30
TORCH_WORDS = "CUDA out of memory. Tried to allocate 2.00 GiB"


@pytest.fixture(scope="module")
def data(data4):
    return data4


def out_of_memory_at(monkeypatch, run: Path, call: int, seen: dict):
    """BatchLoss raising torch's out-of-memory error on its `call`-th batch (the demo preset: one per step), after
    noting the run folder's saved files as they were then."""
    real, calls = BatchLoss.__call__, []

    def loss(self, batch):
        calls.append(1)
        if len(calls) == call:
            seen.update({p: p.read_bytes() for p in run.rglob("*") if p.is_file() and ("checkpoints" in p.parts
                                                                                          or "state" in p.parts)})
            raise torch.cuda.OutOfMemoryError(TORCH_WORDS)
        return real(self, batch)
    monkeypatch.setattr(BatchLoss, "__call__", loss)


def test_out_of_memory_in_the_step_is_one_sentence_keeps_the_checkpoints_and_resumes(tmp_path, data, monkeypatch,
                                                                                      capsys):
    run, saved = tmp_path / "run", {}
    out_of_memory_at(monkeypatch, run, 3, saved)
    assert main(train_args(data, run)) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and TORCH_WORDS not in err
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert len(lines) == 1
    assert lines[0].startswith("error: CUDA ran out of memory at step 3: the run ")
    assert "than this machine had free" in lines[0]  # no card and no budget here: no figure for "available"
    assert lines[0].endswith(f"then resume with: sdlora train --resume {run} (every earlier checkpoint and the "
                             "training state of step 2 are intact).")
    written = [json.loads(line) for line in RunDir(run).events_path.read_text().splitlines()]
    last = written[-1]
    assert (last["event"], last["step"], "error: " + last["message"]) == ("error", 2, lines[0])
    assert not any(e["event"] == "step" and e["step"] == 3 for e in written)
    assert not [key for line in written for key in line if key.startswith("gpu_") or key == "warning"]  # CPU
    # Nothing was saved on the way out: every checkpoint and state file is byte for byte what it was.
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and ("checkpoints" in p.parts
                                                                           or "state" in p.parts)}
    assert saved and after == saved
    assert sorted(p.name for p in (run / "checkpoints").glob("*.safetensors")) == [
        "demo-lora-step-000001.safetensors", "demo-lora-step-000002.safetensors"]
    monkeypatch.undo()
    assert_resume_finishes(run, capsys)


class Change:
    def __init__(self, label, overrides, peak):
        self.label, self.overrides, self.peak_bytes = label, overrides, peak


@pytest.fixture
def traced(monkeypatch):
    """trainer.memory as the interface gives it, with known figures (the trace itself is tested elsewhere)."""
    module = types.ModuleType("trainer.memory")
    module.predict_memory = lambda cfg: types.SimpleNamespace(peak_bytes=int(9.8 * GIB))
    budgets = []

    def changes_to_fit(cfg, budget):
        budgets.append(budget)
        return [Change("cache the text-encoder states", {"dataset.cache_text_encoder_outputs": True}, int(8.9 * GIB)),
                Change("an 8-bit optimizer", {"train.optimizer": "adamw8bit"}, int(7.4 * GIB))]
    module.changes_to_fit = changes_to_fit
    monkeypatch.setitem(sys.modules, "trainer.memory", module)
    return budgets


def a_config(tmp_path, *overrides):
    return resolve_config("demo", [f"output.dir={tmp_path}", *overrides])


def test_the_sentence_names_the_prediction_the_card_and_the_changes_that_fit(tmp_path, traced):
    error = gm.out_of_memory_error(a_config(tmp_path), RunDir(tmp_path), 7, 8 * GIB)
    assert str(error) == (
        "CUDA ran out of memory at step 7: the run was predicted to need 9.8 GB and the card has 8.0 GB; changes "
        "that fit: cache the text-encoder states (--set dataset.cache_text_encoder_outputs=true, 8.9 GB), then an "
        "8-bit optimizer (--set train.optimizer=adamw8bit, 7.4 GB); then start the run again (no training state "
        "was saved yet).")
    assert traced == [8 * GIB]  # the changes that fit the card


def test_without_a_card_the_sentence_says_the_budget_or_this_machine(tmp_path, traced):
    cfg = a_config(tmp_path)
    if hasattr(cfg.train, "memory_budget_gb"):
        budgeted = a_config(tmp_path, "train.memory_budget_gb=8")
        words = str(gm.out_of_memory_error(budgeted, RunDir(tmp_path), None, None))
        assert words.startswith("CUDA ran out of memory outside the training step (caching, samples or validation): "
                                "the run was predicted to need 9.8 GB and the budget (train.memory_budget_gb) is "
                                "8.0 GB; changes that fit: cache the text-encoder states")
        assert traced == [8 * GIB]
    words = str(gm.out_of_memory_error(cfg, RunDir(tmp_path), 3, None))
    assert words == ("CUDA ran out of memory at step 3: the run was predicted to need 9.8 GB, more than this machine "
                     f"had free; {gm.SPILL_FIX}; then start the run again (no training state was saved yet).")


def test_changes_that_are_not_enough_are_said_so(tmp_path, traced):
    words = str(gm.out_of_memory_error(a_config(tmp_path), RunDir(tmp_path), 2, 6 * GIB))
    assert ("the card has 6.0 GB; even cache the text-encoder states (--set dataset.cache_text_encoder_outputs=true, "
            "8.9 GB), then an 8-bit optimizer (--set train.optimizer=adamw8bit, 7.4 GB) leave it above 6.0 GB, so "
            "this run needs a larger card;") in words


def test_a_prediction_that_fits_points_at_other_programs(tmp_path, traced, monkeypatch):
    monkeypatch.setattr(gm, "changes_that_fit", lambda cfg, budget: [])
    words = str(gm.out_of_memory_error(a_config(tmp_path), RunDir(tmp_path), 2, 12 * GIB))
    assert "predicted to need 9.8 GB and the card has 12.0 GB; other programs may hold part of the card" in words


def test_near_full_is_within_five_percent_of_the_card():
    card = 8 * GIB
    assert not gm.near_full(int(0.949 * card), card)
    assert gm.near_full(card - card // 20, card) and gm.near_full(card + 1, card)
    assert not gm.near_full(10, 0)


def test_slowdown_needs_three_times_the_run_s_own_first_steps_and_a_full_card():
    card, full, roomy = 8 * GIB, 8 * GIB - 100, 4 * GIB
    first = [5.0, 1.0, 1.1, 0.9, 1.0, 1.0]  # step 1 pays the warm-up: not the run's pace
    assert gm.slowdown(first + [3.2, 3.0, 3.1], full, card) == pytest.approx(3.1)
    assert gm.slowdown(first + [3.2, 3.0, 3.1], roomy, card) is None  # slow, but not for want of memory
    assert gm.slowdown(first + [2.5, 2.9, 2.8], full, card) is None  # not 3x
    assert gm.slowdown(first + [9.0, 1.0, 1.0], full, card) is None  # one slow step (a sample) is no trend
    assert gm.slowdown(first + [3.2, 3.1], full, card) is None  # too few steps to tell


def test_the_watch_writes_the_peaks_and_each_warning_once(tmp_path, traced, capsys):
    watch = gm.MemoryWatch(a_config(tmp_path), 8 * GIB, int(7.4 * GIB))
    assert watch.started_fields() == {"gpu_card_bytes": 8 * GIB, "gpu_predicted_bytes": int(7.4 * GIB)}
    assert watch.after_step(1.0, 6 * GIB, 5 * GIB) == {"gpu_reserved_bytes": 6 * GIB, "gpu_allocated_bytes": 5 * GIB}
    full = int(7.8 * GIB)
    fields = watch.after_step(1.0, full, 7 * GIB)
    assert fields["warning"] == (
        "GPU memory is within 5% of the card (7.8 GB of 8.0 GB), where Windows may spill into system memory and "
        "steps crawl; if they slow down, apply the changes that fit 7.2 GB: cache the text-encoder states (--set "
        "dataset.cache_text_encoder_outputs=true, 8.9 GB), then an 8-bit optimizer (--set "
        "train.optimizer=adamw8bit, 7.4 GB).")
    assert traced == [int(0.9 * 8 * GIB)]  # what leaves the card a tenth free
    assert "warning" not in watch.after_step(1.0, full, 7 * GIB)
    for _ in range(4):
        watch.after_step(1.0, full, 7 * GIB)
    slow = [watch.after_step(4.0, full, 7 * GIB) for _ in range(3)]
    assert [("warning" in f) for f in slow] == [False, True, False]
    assert slow[1]["warning"].startswith("Steps became 4x slower than this run's first ones while GPU memory is at "
                                         "the card's limit (7.8 GB of 8.0 GB)")
    assert capsys.readouterr().err.count("warning: ") == 2
    line = StepEvent(step=9, **slow[1]).record()
    assert parse(line) == StepEvent(step=9, **slow[1])  # the fields read back from events.jsonl


def test_the_memory_words_read_as_cards_are_sold():
    assert gm.gb(8 * GIB) == "8.0 GB" and gm.gb(int(7.4 * GIB)) == "7.4 GB" and gm.gb(30 * 2 ** 20) == "30 MB"
