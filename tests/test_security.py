"""Typed paths are checked before use, with one-sentence errors; the server binds to loopback by default."""
from pathlib import Path

import pytest

from app.security import is_inside, is_loopback, new_folder, parse_auth, servable, user_file, user_folder
from networks.errors import SdloraError


def test_user_folders_must_exist_and_be_folders(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    assert user_folder(f"  '{tmp_path}'  ") == tmp_path.resolve()
    for text, message in (("", "Enter the dataset folder."), (tmp_path / "nope", "does not exist; check the path."),
                          (tmp_path / "file.txt", "is a file, not a folder")):
        with pytest.raises(SdloraError, match=message):
            user_folder(text, "dataset folder")


def test_user_files_must_exist_and_have_the_right_extension(tmp_path):
    (tmp_path / "a.safetensors").write_bytes(b"x")
    (tmp_path / "a.ckpt").write_bytes(b"x")
    assert user_file(tmp_path / "a.safetensors", suffixes=(".safetensors",)) == tmp_path / "a.safetensors"
    with pytest.raises(SdloraError, match=r"a.ckpt is not a .safetensors file"):
        user_file(tmp_path / "a.ckpt", "LoRA file", suffixes=(".safetensors",))
    with pytest.raises(SdloraError, match="is a folder"):
        user_file(tmp_path, "LoRA file")


def test_new_folders_are_empty_or_absent_under_an_existing_parent(tmp_path):
    assert new_folder(tmp_path / "fresh") == tmp_path / "fresh"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(SdloraError, match="is not empty"):
        new_folder(tmp_path / "full")
    with pytest.raises(SdloraError, match="parent folder .* does not exist"):
        new_folder(tmp_path / "a" / "b")


def test_only_files_inside_the_roots_are_served(tmp_path):
    root = tmp_path / "runs"
    (root / "r").mkdir(parents=True)
    (tmp_path / "secret").write_text("x")
    (root / "r" / "link").symlink_to(tmp_path / "secret")
    assert servable(root / "r" / "x.safetensors", [root]) == (root / "r" / "x.safetensors").resolve()
    for outside in (tmp_path / "secret", root / ".." / "secret", root / "r" / "link"):
        assert not is_inside(outside, root)
        with pytest.raises(SdloraError, match="outside the runs folder"):
            servable(outside, [root])


def test_auth_and_hosts():
    assert parse_auth(None) is None and parse_auth("") is None
    assert parse_auth("me:se:cret") == ("me", "se:cret")
    assert parse_auth(("me", "pw")) == ("me", "pw")
    for bad in ("nopassword", ":pw", "me:"):
        with pytest.raises(SdloraError, match="USER:PASS"):
            parse_auth(bad)
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2") and not is_loopback("example.org")


def test_paths_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    assert user_folder("data") == Path(tmp_path / "data").resolve()
