"""An ensemble's members as a file: one checkpoint path per line, ``#`` comment lines and blank lines allowed;
a relative path is relative to the file's folder. ``scripts/select_ensemble.py`` writes one; ``evaluate.py``,
``predict.py`` and ``export.py`` take it as ``--members FILE`` instead of ``--ckpt ...``.

The file is data: it is read with a bound on its size, and names nothing but existing checkpoint files (which
are then read as safely as any checkpoint)."""

import os
from collections.abc import Sequence
from pathlib import Path

from mnist_lit.errors import UserError

MAX_BYTES = 64 * 1024  # a few hundred paths; a list of an ensemble's members is far smaller
MEMBERS_HELP = "instead of --ckpt: a file listing the checkpoints, one a line (as select_ensemble.py writes)"


def add_checkpoint_arguments(parser, help: str, nargs: str | None = "+") -> None:
    """The scripts' ``--ckpt PATH ...`` or ``--members FILE``, one of them required. ``nargs=None``: one path
    per ``--ckpt``, given again for more (predict.py: its image paths follow)."""
    which = parser.add_mutually_exclusive_group(required=True)
    if nargs is None:
        which.add_argument("--ckpt", action="append", metavar="PATH", help=help)
    else:
        which.add_argument("--ckpt", nargs=nargs, action="extend", metavar="PATH", help=help)
    which.add_argument("--members", metavar="FILE", help=MEMBERS_HELP)


def read_members(path) -> list[Path]:
    """The checkpoint paths a members file lists, in its order; UserError naming the file (and line) if it is
    missing, too large, not UTF-8 text, empty, or names a path that is not an existing file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as err:
        raise UserError(f"cannot read the members file {path}: {err.strerror or err}") from None
    if len(data) > MAX_BYTES:
        raise UserError(f"{path}: larger than {MAX_BYTES // 1024} KiB, not a members file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a members file (not UTF-8 text)") from None
    members = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        member = path.parent / line  # an absolute line stays as it is
        if not member.is_file():
            raise UserError(f"{path} line {number}: {line} is not a file (relative paths are to {path.parent})")
        members.append(member)
    if not members:
        raise UserError(f"{path}: lists no checkpoint")
    return members


def members_text(ckpts: Sequence, folder, comments: Sequence[str] = ()) -> str:
    """A members file's text: ``comments`` as ``#`` lines, then each checkpoint's path relative to ``folder``
    (where the file goes), so the runs and the list can move together."""
    lines = [f"# {comment}".rstrip() for comment in comments]
    lines += [os.path.relpath(Path(ckpt).resolve(), Path(folder).resolve()) for ckpt in ckpts]
    return "\n".join(lines) + "\n"


def write_members(path, ckpts: Sequence, comments: Sequence[str] = (), force: bool = False) -> None:
    """Write a members file atomically (a temporary file beside it, then renamed): a crash leaves the old file
    or none, never half a list. UserError if it exists and ``force`` is not set."""
    path = Path(path)
    if path.exists() and not force:
        raise UserError(f"{path} exists; pass --force to replace it, or another --out")
    partial = path.with_name(path.name + ".part")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(members_text(ckpts, path.parent, comments))
        os.replace(partial, path)
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror or err}") from None
    finally:
        partial.unlink(missing_ok=True)


def checkpoints_of(ckpts: Sequence | None, members: str | None) -> list:
    """The checkpoints a command names: ``--ckpt`` paths, or those of a ``--members`` file."""
    return read_members(members) if members else list(ckpts)
