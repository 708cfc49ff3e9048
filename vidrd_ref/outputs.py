"""What an output path may replace: `--force` replaces only what vidrd itself writes there, never a user's folder.

Three kinds of output: a file (a video, a JSON report), a folder of PNG frames (`frame_00000.png` ...), a model
folder in the official layout. An existing target is replaceable when it is that kind of thing as vidrd makes it:
a regular file; a folder holding nothing but frames; a folder holding nothing but the official layout's entries.
Never: the working folder or one of its parents (`.`, `..`), `/`, a mount point, a symbolic link, a device or any
other special file. Every command checks its outputs with `check_target` before any work.
"""
from __future__ import annotations

import os
import re
import stat
import tempfile
from pathlib import Path

KINDS = ("file", "frames", "model")
FRAME_NAME = re.compile(r"^frame_\d{5}\.png$")
MODEL_ENTRIES = frozenset({"sd", "vae_finetuned", "ModelT2V.safetensors", "ModelT2V.pth"})


def check_target(path, force: bool, kind: str, *, parent_may_be_missing: bool = False) -> None:
    """Raise before any work unless `path` may be written as a `kind` output: new, or (with force) replaceable.

    FileExistsError without force (suggesting --force only where it would be honoured); FileExistsError naming
    what is in the way when the target is not vidrd's to replace; FileNotFoundError when its folder is missing."""
    assert kind in KINDS, kind
    path = Path(path)
    _refuse_special_path(path)
    try:
        st = path.lstat()
    except FileNotFoundError:
        st = None
    if st is not None:
        reason = _not_ours(path, st, kind)
        if reason is not None:
            raise FileExistsError(f"{path} {reason}; --force replaces only what vidrd writes: choose another output "
                                  "name, or move it away yourself")
        if not force:
            raise FileExistsError(f"{path} exists; pass --force to replace it")
    folder = path.absolute().parent
    if not folder.is_dir():
        if parent_may_be_missing:
            return
        raise FileNotFoundError(f"output folder {path.parent} does not exist")
    try:  # the only exact test of writability (permissions, read-only mounts, root): make and drop a file
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise PermissionError(f"cannot write to the output folder {path.parent} ({e.strerror})") from None


def _refuse_special_path(path: Path) -> None:
    """The working folder, its parents and the root are never an output, whatever exists there."""
    here = Path.cwd().resolve()
    try:
        target = path.resolve()
    except (OSError, RuntimeError):  # a symlink loop: refused below as a link
        return
    if path.name in ("", ".", "..") or target == here or target in here.parents:
        raise FileExistsError(f"{path} is the working folder or one of its parents ({target}): never an output; "
                              "name a new file or folder inside it")


def _not_ours(path: Path, st: os.stat_result, kind: str) -> str | None:
    """Why an existing `path` is not a `kind` output vidrd could have written, or None when it is."""
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if kind == "file":
        if stat.S_ISDIR(st.st_mode):
            return "is a folder"
        return None if stat.S_ISREG(st.st_mode) else "is not a regular file (a device, pipe or socket)"
    if not stat.S_ISDIR(st.st_mode):
        return "is a file, not a folder" if stat.S_ISREG(st.st_mode) else "is a device, pipe or socket, not a folder"
    if os.path.ismount(path):
        return "is a mount point"
    foreign = sorted(e.name + ("/" if e.is_dir(follow_symlinks=False) else "") for e in os.scandir(path)
                     if not _own_entry(e, kind))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        what = "PNG frames" if kind == "frames" else "a model in the official layout"
        return f"holds files that are not {what} ({shown})"
    return None


def _own_entry(entry: os.DirEntry, kind: str) -> bool:
    if kind == "frames":
        return bool(FRAME_NAME.match(entry.name)) and entry.is_file(follow_symlinks=False)
    return entry.name in MODEL_ENTRIES and not entry.is_symlink()
