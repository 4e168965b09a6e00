"""A copy of the tree with bench/proposals/*.patch applied, so the proposed trainer changes are measured
exactly as they would land: `--proposed` in bench.train_step / bench.end_to_end adds contenders that run
from this copy (PYTHONPATH and cwd point at it, ahead of the editable install).

A patch that no longer applies (already applied to the tree, or its context changed) is skipped and
reported; with none applied, the proposed contenders are left out.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from bench.models import BENCH_DIR, REPO_ROOT, work_dir

PATCHES = BENCH_DIR / "proposals"
COPIED = ("app", "trainer", "networks", "presets", "bench")
IGNORED = shutil.ignore_patterns(".work", "__pycache__", "results", "*.pyc")


def proposed_tree() -> tuple[Path | None, dict[str, str]]:
    """(the patched copy, {patch: "applied" | why not}); the copy is None when nothing applied."""
    tree = work_dir() / "proposed"
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir(parents=True)
    for name in COPIED:
        shutil.copytree(REPO_ROOT / name, tree / name, ignore=IGNORED)
    status = {}
    for patch in sorted(PATCHES.glob("*.patch")):
        command = ["patch", "-p1", "--forward", "--batch", "--silent", "-d", str(tree), "-i", str(patch)]
        check = subprocess.run(command + ["--dry-run"], capture_output=True, text=True)
        if check.returncode == 0:
            check = subprocess.run(command, capture_output=True, text=True)
        status[patch.name] = "applied" if check.returncode == 0 else \
            f"not applied: {(check.stdout + check.stderr).strip()[:200]}"
    applied = any(v == "applied" for v in status.values())
    return (tree if applied else None), status
