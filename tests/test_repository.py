"""The repository stands on its own: no tracked file names a path outside it.

A fresh clone on another machine has only what git tracks, so a path into the author's machine (a
shared folder next to the checkout, an absolute path to a home or work directory) breaks there.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Spelled in pieces so that this file does not match its own patterns.
OUTSIDE_PATHS = re.compile(
    "|".join(
        [
            "/" + "work/",  # the development machine's work directory
            r"\.\./" + "shared",  # a folder beside the checkout
            "/" + r"home/\w",  # someone's home directory
            "/" + r"Users/\w",  # the same on macOS
        ]
    )
)


def tracked_files() -> list[Path]:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=False)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    return [ROOT / name for name in listed.stdout.decode().split("\0") if name]


def outside_paths(files: list[Path], root: Path = ROOT) -> list[str]:
    """`path:line: text` for every line of these text files that names a path outside the repository."""
    found = []
    for path in files:
        try:
            data = path.read_bytes()
        except FileNotFoundError:  # deleted in the working tree, not yet in the index
            continue
        if b"\0" in data:  # binary
            continue
        for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), start=1):
            if OUTSIDE_PATHS.search(line):
                found.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    return found


def test_no_tracked_file_names_a_path_outside_the_repository() -> None:
    files = tracked_files()
    assert files, "git ls-files listed nothing"
    assert outside_paths(files) == []


def test_the_check_finds_planted_paths(tmp_path: Path) -> None:
    planted = tmp_path / "planted.md"
    planted.write_text("fine\nsee ../" + "shared/NOTES.md\nspec = '/" + "work/models'\n~/.cache is fine\n")
    binary = tmp_path / "data.bin"
    binary.write_bytes(b"\0/" + b"work/")
    assert outside_paths([planted, binary], root=tmp_path) == [
        "planted.md:2: see ../" + "shared/NOTES.md",
        "planted.md:3: spec = '/" + "work/models'",
    ]
