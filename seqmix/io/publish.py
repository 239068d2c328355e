"""Saving into a folder safely: what a target may be (new, empty, or a seqmix model directory whose own files
alone are replaced), a staged sibling folder swapped in under a lock, and the leftovers of killed saves cleaned.

A save writes into `.<name>.tmp-<pid>-<hex>/` next to the target. When it is complete, under an exclusive
`flock` on the parent folder (so concurrent saves to one target take turns instead of crashing), the target's
other files are hard-linked (copied where links fail) into it, the target is renamed to `.<name>.old-<pid>-<hex>`,
the new folder renamed to the target, and the old one deleted. A save killed at any point leaves the target as
it was (or, in the instant between the two renames, the old folder under its hidden name): the next save to the
same target deletes leftovers whose process is gone and puts such an old folder back."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from seqmix.io.files import CONFIG_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME, PathLike

TOKENIZER_CONFIG_NAME = "tokenizer_config.json"  # seqmix.tokenizer's record of the model's tokenizer
OWN_FILES = frozenset({CONFIG_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME, TOKENIZER_CONFIG_NAME})
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
OVERWRITE_HINT = "pass --overwrite (seqmix.io.save(..., overwrite=True))"


class SaveError(OSError):
    """A save that could not be completed (a full disk, a folder that cannot be written); the target is as it
    was before."""


class SaveRefusedError(SaveError, FileExistsError):
    """A save refused before anything was written: the target holds files seqmix must not replace."""


def is_own_file(name: str) -> bool:
    """Whether `name` is one of the files a seqmix model directory consists of (replaced by an overwrite)."""
    return name in OWN_FILES or bool(_SHARD.fullmatch(name))


def is_seqmix_dir(directory: PathLike) -> bool:
    """Whether `directory` holds a config.json written by seqmix.io.save (model_type "seqmix")."""
    try:
        cfg = json.loads((Path(directory) / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and cfg.get("model_type") == "seqmix"


def _names(paths: list[str], limit: int = 8) -> str:
    more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
    return ", ".join(paths[:limit]) + more


def check_target(directory: Path, overwrite: bool) -> None:
    """Refuse (SaveRefusedError) a target that is a file, a non-empty folder that is not a seqmix model
    directory, or, without `overwrite`, a seqmix model directory."""
    if not directory.exists():
        return
    if not directory.is_dir():
        raise SaveRefusedError(f"{directory} is a file, not a folder; save into a new or empty folder")
    entries = sorted(p.name for p in directory.iterdir())
    if not entries:
        return
    if not is_seqmix_dir(directory):
        raise SaveRefusedError(
            f"{directory} is not empty and is not a seqmix model directory: it holds {_names(entries)}. seqmix "
            "saves only into a new or empty folder, or over a seqmix model (replacing its own files); nothing was "
            "written: choose another folder")
    if not overwrite:
        raise SaveRefusedError(
            f"{directory} already holds a seqmix model; to replace it {OVERWRITE_HINT}: that replaces its "
            f"model files ({CONFIG_NAME}, model*.safetensors, {WEIGHTS_INDEX_NAME}, {TOKENIZER_CONFIG_NAME}) and "
            "keeps every other file in it")


def refuse_source(src: PathLike, dst: PathLike) -> None:
    """Refuse to save into `dst` when it is `src` or a folder holding it (a conversion must never replace or
    delete the checkpoint it reads)."""
    s, d = Path(src).resolve(), Path(dst).resolve()
    if s == d or d in s.parents:
        raise SaveRefusedError(f"{dst} {'is' if s == d else 'contains'} the source checkpoint {src}; write the "
                               "converted model to another folder (seqmix never replaces its source)")


# -- temp names, liveness, cleaning -------------------------------------------------------------------
def _temp_name(final: Path, kind: str) -> Path:
    return final.with_name(f".{final.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def _leftover(final: Path) -> re.Pattern:
    # ours (with the writer's pid), and the names older seqmix versions used (no pid: never in use by this one)
    n = re.escape(final.name)
    return re.compile(rf"\.{n}\.(?:(tmp|old)-(\d+)-[0-9a-f]{{8}}|(tmp)-[a-z0-9_]{{8}}|(old)|(export-tmp))")


def _started(pid: int) -> Optional[float]:
    """When process `pid` started (seconds since the epoch), from /proc; None where unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _alive(pid: int, path: Path) -> bool:
    """Whether the process that made `path` may still be writing it: `pid` runs and did not start after the
    folder last changed (a reused pid started later)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # runs, as another user
    started = _started(pid)
    try:
        return started is None or path.lstat().st_ctime >= started - 1
    except FileNotFoundError:
        return False


def clean_leftovers(final: Path) -> list[Path]:
    """Delete the hidden folders killed saves to `final` left beside it (call under the parent's lock); an old
    copy of the target left in the instant between the two renames is renamed back when the target is missing.
    Returns what was removed or restored."""
    pattern, done = _leftover(final), []
    for p in sorted(final.parent.iterdir()):
        m = pattern.fullmatch(p.name)
        if m is None or (m[2] is not None and _alive(int(m[2]), p)):
            continue
        if (m[1] or m[4]) == "old" and not final.exists():
            os.rename(p, final)
        else:
            shutil.rmtree(p, ignore_errors=True)
        done.append(p)
    return done


# -- staging and publishing ---------------------------------------------------------------------------
@contextmanager
def _parent_lock(parent: Path) -> Iterator[None]:
    fd = os.open(parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def target_dir(directory: PathLike) -> Path:
    """The folder a save writes: `directory`, or the folder a symlink `directory` points to."""
    directory = Path(directory)
    return directory.resolve() if directory.is_symlink() else directory


@contextmanager
def staged_dir(directory: PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """A new hidden sibling folder of `directory` to fill; when the block ends without an error it becomes
    `directory` (see the module docstring), files from the umask's mode. The target is checked first
    (check_target) and again under the lock; an OSError while filling (a full disk) becomes a SaveError that
    names the target, which is left as it was."""
    final = target_dir(directory)
    check_target(final, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(final, "tmp")
    os.mkdir(tmp)  # mode 0o777 less the umask, as for any folder the user makes
    try:
        try:
            yield tmp
        except SaveError:
            raise
        except OSError as e:
            raise SaveError(_write_failed(final, e)) from e
        with _parent_lock(final.parent):
            clean_leftovers(final)
            check_target(final, overwrite)  # another writer may have published meanwhile
            try:
                _publish(tmp, final)
            except OSError as e:
                raise SaveError(_write_failed(final, e)) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_failed(final: Path, e: OSError) -> str:
    what = f"{e.filename}: " if e.filename else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = f" ({shutil.disk_usage(final.parent).free / 2**20:.1f} MiB free)"
        except OSError:
            free = ""
        return (f"saving {final} failed: {what}no space left on the device of {final.parent}{free}; free some "
                f"space or save elsewhere. {final} was left as it was")
    return f"saving {final} failed: {what}{e.strerror or e}. {final} was left as it was"


def _link_into(src: Path, dst: Path) -> None:
    """`src` (a file, link or folder) at `dst` without copying data where the file system allows hard links."""
    def link(a: str, b: str) -> None:
        try:
            os.link(a, b, follow_symlinks=False)
        except OSError:
            shutil.copy2(a, b, follow_symlinks=False)

    if src.is_dir() and not src.is_symlink():
        shutil.copytree(src, dst, symlinks=True, copy_function=link)
    else:
        link(str(src), str(dst))


def _publish(tmp: Path, final: Path) -> None:
    """Make the finished folder `tmp` the target `final`, keeping the files of `final` that are not a seqmix
    model's own (check_target has allowed replacing it)."""
    if not final.exists():
        os.rename(tmp, final)
        return
    for p in final.iterdir():
        if not is_own_file(p.name):
            _link_into(p, tmp / p.name)
    shutil.copymode(final, tmp)
    old = _temp_name(final, "old")
    os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
