"""Inputs a user can get wrong on `sdlora train`'s command line or in its config file: each ends in exit 1 and
one sentence naming the flag, key or path and what to do, never "unexpected ..." (exit 2)."""
import os

import pytest

from app.cli import main
from trainer.demo.demo_data import make_demo_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    make_demo_dataset(folder, count=2)
    return folder


def error_line(capsys, argv: list[str]) -> str:
    """Run the CLI; it must exit 1 and end stderr with one `error:` line, no traceback (a first use may print
    the demo model's build progress before it)."""
    assert main(argv) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in err, err
    return last.removeprefix("error: ")


def train_argv(data, output, *more: str) -> list[str]:
    return ["train", "--model", "demo:sd1", "--data", str(data), "--output", str(output), "--no-progress",
            "--set", "train.max_steps=1", *more]


@pytest.mark.parametrize("key, value", [
    ("train.learning_rate", "inf"), ("network.alpha", "inf"), ("train.learning_rate", "nan"),
    ("network.alpha_ratio", "-inf"), ("train.noise_offset", "nan"), ("ema.decay", "nan"),
    ("train.optimizer_args.eps", "inf"),
])
def test_non_finite_numbers_are_refused_naming_the_key(capsys, tmp_path, data, key, value):
    run = tmp_path / "run"
    assert error_line(capsys, train_argv(data, run, "--set", f"{key}={value}")) == \
        f"{key} must be a finite number (got {value})."
    assert not run.exists()


def test_a_config_file_with_inf_is_refused_naming_the_file(capsys, tmp_path, data):
    config = tmp_path / "my.toml"
    config.write_text(f'[dataset]\npath = "{data.as_posix()}"\n[output]\ndir = "{(tmp_path / "run").as_posix()}"\n'
                      "[network]\nalpha = inf\n")
    assert error_line(capsys, ["train", "--config", str(config)]) == \
        f"network.alpha in {config} must be a finite number (got inf)."


def test_max_grad_norm_keeps_inf_as_never_clip(tmp_path):
    from trainer.config import config_from_dict

    assert config_from_dict({"train": {"max_grad_norm": float("inf")}}).train.max_grad_norm == float("inf")
    with pytest.raises(Exception, match=r"^train.max_grad_norm must be a number >= 0 \(got nan\)\.$"):
        config_from_dict({"train": {"max_grad_norm": float("nan")}})


@pytest.mark.parametrize("flag, message", [
    ("--data", "--data is empty; give the folder of images."),
    ("--model", "--model is empty; give a diffusers folder, a .safetensors/.ckpt file or demo:shapes."),
    ("--output", "--output is empty; give the run folder."),
    ("--name", "--name is empty; give the exported file's name."),
])
@pytest.mark.parametrize("blank", ["", "   "])
def test_blank_flags_are_refused_not_read_as_the_current_folder(capsys, tmp_path, data, flag, message, blank):
    argv = train_argv(data, tmp_path / "run")
    if flag in argv:
        argv[argv.index(flag) + 1] = blank
    else:
        argv += [flag, blank]
    assert error_line(capsys, argv) == message
    assert list(tmp_path.iterdir()) == []


MODEL_PATH_EMPTY = "model.path in {} is empty; give a diffusers folder, a .safetensors/.ckpt file or demo:shapes"
BLANK_CONFIG_PATHS = {  # (section, its path value) -> the sentence, {} standing for the config file
    ("model", ""): MODEL_PATH_EMPTY + " (got '').",
    ("model", "  "): MODEL_PATH_EMPTY + " (got '  ').",
    ("dataset", "  "): "dataset.path in {} is only spaces; give the folder of images (got '  ').",
}


@pytest.mark.parametrize("section, value", list(BLANK_CONFIG_PATHS))
def test_blank_paths_in_a_config_are_refused(capsys, tmp_path, section, value):
    message = BLANK_CONFIG_PATHS[section, value]
    config = tmp_path / "c.toml"
    config.write_text(f'[{section}]\npath = "{value}"\n[output]\ndir = "{(tmp_path / "run").as_posix()}"\n')
    assert error_line(capsys, ["train", "--config", str(config)]) == message.format(config)
    assert not (tmp_path / "run").exists()


def test_output_naming_a_file_is_refused_before_anything_is_written(capsys, tmp_path, data):
    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    assert error_line(capsys, train_argv(data, taken)) == (
        f"The run folder {taken} is a file, not a folder; give --output (output.dir) a new folder's name or an "
        "earlier run's folder.")
    assert taken.read_text() == "mine"


@pytest.mark.parametrize("where, reason", [("/proc/sdlora-run", "no such file or directory"),
                                           ("notes.txt/run", "not a directory")])
def test_output_where_no_folder_can_be_made_is_one_sentence(capsys, tmp_path, data, where, reason):
    (tmp_path / "notes.txt").write_text("mine")
    if where.startswith("/proc") and not os.path.isdir("/proc"):
        pytest.skip("no /proc on this system")
    output = where if where.startswith("/") else tmp_path / where
    assert error_line(capsys, train_argv(data, output)) == (
        f"The run folder {output} cannot be made ({reason}); give --output (output.dir) a folder in a place you "
        "can write to.")


def test_data_that_is_a_file_is_called_a_file(capsys, tmp_path):
    photo = tmp_path / "photo.png"
    photo.write_bytes(b"not a folder")
    assert error_line(capsys, train_argv(photo, tmp_path / "run")) == (
        f"Dataset folder '{photo}' is a file, not a folder; point dataset.path at a folder of images.")
