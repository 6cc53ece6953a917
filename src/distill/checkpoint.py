"""Artifacts are complete or absent: write under a temporary name, then rename.

Training checkpoints live in ``OUT/checkpoints/step_XXXXXXXX``; a directory is complete when it has
been renamed from its ``.tmp`` name and holds ``trainer_state.json`` (written last). Anything else is
the debris of an interrupted write and is ignored (and cleaned up by the next save). Files written here, or
in a directory committed here, get the mode of any file the user creates (0666 less the umask).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import stat
from pathlib import Path

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def _create_temporary(path: Path) -> tuple[int, Path]:
    """A new file ``.NAME.XXXXXXXXXXXX.tmp`` beside ``path``, open for writing, with the mode any file the user
    creates gets (0666 less the umask: ``tempfile.mkstemp`` would make it 0600, private to the user)."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def atomic_write_bytes(path: Path, blob: bytes) -> None:
    """Write under a temporary name in the same directory, fsync, rename: complete or absent."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temporary(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(blob)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def tmp_dir_for(final: Path) -> Path:
    return final.with_name(final.name + ".tmp")


def default_file_mode(directory: Path) -> int:
    """The mode a new file gets in ``directory`` (0666 less the umask), read from a probe file: reading the umask
    itself means setting it, which other threads would see."""
    fd, probe = _create_temporary(Path(directory) / "mode-probe")
    try:
        return stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)


def give_default_modes(directory: Path) -> None:
    """Files that a library wrote private (0600: safetensors does) get the mode of any file the user creates."""
    files = [p for p in Path(directory).rglob("*") if p.is_file() and not p.is_symlink()]
    if not any(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files):
        return
    mode = default_file_mode(directory)
    for p in files:
        if stat.S_IMODE(p.stat().st_mode) == 0o600 and mode != 0o600:
            os.chmod(p, mode)


def commit_dir(tmp: Path, final: Path) -> None:
    """Rename a fully written directory into place (replacing an older one of the same name), its files with
    the user's usual mode."""
    give_default_modes(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and child.is_dir() and (child / STATE_FILE).is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1][1] if ckpts else None


def prune_checkpoints(root: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints, and stale temporary directories."""
    for child in Path(root).glob("step_*.tmp"):
        shutil.rmtree(child, ignore_errors=True)
    ckpts = list_checkpoints(root)
    for _, path in ckpts[: max(len(ckpts) - keep_last, 0)]:
        shutil.rmtree(path, ignore_errors=True)


def read_state(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / STATE_FILE).read_text())
