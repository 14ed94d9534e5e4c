"""Run directories written as transactions: whole or not at all, one writer at a time.

``train`` writes a new run into a sibling folder and swaps it in with one rename, so after any
crash ``run_dir`` is the complete old run or the complete new one. ``test`` writes its results
into a folder inside the run and moves them in with ``metrics.json`` last: metrics.json present
means the results beside it are complete and from this model. A lock file ``.NAME.lock`` beside
the run keeps a second writer out.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from hamacho.errors import ArtifactError, OutputError

# metrics.json last: the marker; sites/ holds one result folder per dataset of a per-site test
TEST_FILES = ("scores.csv", "maps", "sites", "report.html", "metrics.json")
# the run's own files; the default exports too, so a retrain never keeps a stale exported model
EXPORTS = ("model.onnx", "model.xml", "model.bin")
RUN_FILES = frozenset(
    {"model.safetensors", "config.yaml", "train.json", "merge.json", *TEST_FILES, *EXPORTS}
)
# staging folders and backups (ours), and save_artifact's temporary files
_TEMP = re.compile(r"\..+\.(tmp|old)-\d+-[0-9a-f]{8}|\..+\.\d+\.[0-9a-f]{8}\.tmp")
_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def check_output(path: str | os.PathLike) -> Path:
    """``path`` resolved, or OutputError if it cannot be a run folder (checked before any work)."""
    run_dir = _not_a_file(path, "output")
    run_dir = run_dir.resolve()  # a symlinked run folder is replaced where it points
    cwd = Path.cwd().resolve()
    if run_dir == cwd or run_dir in cwd.parents:
        raise OutputError(
            f"output '{path}' is the current folder (or holds it), which a new run replaces as a "
            "whole. Choose a subfolder, e.g. -o runs/NAME"
        )
    if os.path.ismount(run_dir):
        raise OutputError(
            f"output '{path}' is a mount point, which a new run cannot replace as a whole. "
            f"Choose a folder inside it, e.g. -o {Path(path) / 'run'}"
        )
    return run_dir


def check_folder(path: str | os.PathLike, what: str, fix: str) -> Path:
    """Create folder ``path`` and prove it writable, or raise one OutputError line."""
    folder = _not_a_file(path, f"{what} folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = _sibling(folder / "probe", "tmp")
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        probe.unlink()
    except OSError as exc:
        raise OutputError(cannot(what, folder, exc, fix)) from None
    return folder


def _not_a_file(path: str | os.PathLike, role: str) -> Path:
    """``path`` made absolute; OutputError if it or a folder above it is a file."""
    absolute = Path(path).expanduser().absolute()
    for folder in (absolute, *absolute.parents):
        if folder.is_dir():
            break
        if folder.exists() or folder.is_symlink():
            where = "is a file" if folder == absolute else f"is under '{folder}', which is a file"
            raise OutputError(f"{role} '{path}' {where}. Choose a new or existing folder")
    return absolute


@contextlib.contextmanager
def locked(run_dir: Path, what: str, fix: str) -> Iterator[None]:
    """Hold ``.NAME.lock`` beside ``run_dir``; OutputError naming the holder's pid if taken."""
    lock = run_dir.parent / f".{run_dir.name}.lock"
    try:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise OutputError(cannot(what, run_dir, exc, fix)) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise OutputError(
                f"'{run_dir}' is being written by another hamacho process (pid {holder}, lock "
                f"'{lock}'). Wait for it to finish, or write elsewhere"
            ) from None
        with contextlib.suppress(OSError):  # the pid is a courtesy; a full disk may refuse it
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock; the file stays (deleting it would race the next taker)


@contextlib.contextmanager
def new_run(run_dir: Path, fix: str) -> Iterator[Path]:
    """Yield an empty sibling folder for a whole run; on success it replaces ``run_dir`` at once.

    The old run's files that are not hamacho's (e.g. a benchmark's cell.json) are carried over as
    hard links; its test results are not (they belong to the old model). Hold `locked`.
    """
    recover(run_dir)
    staging = _sibling(run_dir, "tmp")
    try:
        staging.mkdir()
        yield staging
        if run_dir.is_dir():
            _carry_over(run_dir, staging)
        _fsync_tree(staging)
        _swap(staging, run_dir)
    except (OSError, ArtifactError) as exc:
        cause = exc if isinstance(exc, OSError) else exc.__cause__
        if cause is None or not (isinstance(cause, OSError) or "os error" in str(cause)):
            raise  # not a write failure (e.g. metadata that is not JSON)
        message = cannot("the run", run_dir, cause, fix) + "; the old run is unchanged"
        raise OutputError(message) from exc
    finally:
        _remove(staging)  # after the swap it holds the old run


@contextlib.contextmanager
def new_results(run_dir: Path, fix: str) -> Iterator[Path]:
    """Yield an empty folder inside the run for TEST_FILES; on success move them in, marker last."""
    for entry in os.scandir(run_dir):  # a killed test's staging folder, old artifact temps
        if _TEMP.fullmatch(entry.name):
            _remove(Path(entry.path))
    staging = _sibling(run_dir / "results", "tmp")
    marker = run_dir / TEST_FILES[-1]
    state = "the old results are unchanged"
    try:
        staging.mkdir()
        yield staging
        _fsync_tree(staging)
        marker.unlink(missing_ok=True)  # from here on the results there are known incomplete
        state = "the results there are incomplete (no metrics.json): run the test again"
        _fsync_dir(run_dir)
        for name in TEST_FILES:
            if (staging / name).exists():
                _swap(staging / name, run_dir / name)
            else:
                _remove(run_dir / name)  # e.g. old maps/ after a --no-maps test
        _fsync_dir(run_dir)
    except OSError as exc:
        raise OutputError(f"{cannot('test results', run_dir, exc, fix)}; {state}") from exc
    finally:
        _remove(staging)


def recover(target: Path) -> None:
    """Clear what killed saves left beside ``target`` (call only while holding its lock).

    A run moved aside by the two-rename fallback of `_swap` is put back if ``target`` is gone.
    """
    pattern = re.compile(re.escape(f".{target.name}.") + r"(tmp|old)-\d+-[0-9a-f]{8}")
    try:
        found = [Path(e.path) for e in os.scandir(target.parent) if pattern.fullmatch(e.name)]
    except OSError:
        return
    backups = sorted((p for p in found if ".old-" in p.name), key=lambda p: p.stat().st_mtime)
    if backups and not target.exists():
        os.rename(backups[-1], target)
        found.remove(backups[-1])
    for path in found:
        _remove(path)


def cannot(what: str, where: Path, exc: BaseException, fix: str) -> str:
    """One line: writing ``what`` to ``where`` failed with ``exc``, and how to fix it."""
    code = getattr(exc, "errno", None)
    if code is None:  # safetensors reports I/O errors as text: "... (os error 28)"
        found = re.search(r"os error (\d+)", str(exc))
        code = int(found.group(1)) if found else None
    reasons = {
        errno.ENOSPC: ("the disk is full", "Free some space"),
        errno.EDQUOT: ("the disk quota is used up", "Free some space"),
        errno.EROFS: ("the file system is read-only", fix),
        errno.EACCES: ("permission denied", fix),
        errno.EPERM: ("the operation is not permitted", fix),
    }
    text = getattr(exc, "strerror", None) or " ".join(str(exc).split())
    reason, remedy = reasons.get(code or 0, (text, fix))
    return f"cannot write {what} to '{where}': {reason}. {remedy}"


def _sibling(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def _swap(new: Path, target: Path) -> None:
    """Put ``new`` at ``target`` in one step; then ``new`` holds the old ``target``, if any."""
    if new.is_dir() and target.is_dir() and not target.is_symlink():
        if _exchange(new, target):
            return
        # No renameat2 (not Linux, or a file system without it): two renames back to back; a
        # crash between them leaves the old run at .NAME.old-*, which `recover` puts back.
        old = _sibling(target, "old")
        os.rename(target, old)
        os.rename(new, target)
        os.rename(old, new)
        return
    if new.is_dir() or target.is_dir():
        _remove(target)  # a folder replacing a file or the reverse: never in a hamacho run
    os.replace(new, target)


def _exchange(a: Path, b: Path) -> bool:
    """Linux renameat2(RENAME_EXCHANGE): swap two paths atomically; False where unsupported."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _carry_over(old: Path, new: Path) -> None:
    for entry in os.scandir(old):
        if entry.name in RUN_FILES or _TEMP.fullmatch(entry.name) or (new / entry.name).exists():
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.copytree(entry.path, new / entry.name, symlinks=True, copy_function=_link)
        elif entry.is_symlink():
            os.symlink(os.readlink(entry.path), new / entry.name)
        else:
            _link(entry.path, str(new / entry.name))


def _link(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _fsync_tree(root: Path) -> None:
    """Make a staged tree durable before it is renamed in (the rename must not outrun data)."""
    for folder, _, names in os.walk(root):
        for name in names:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))
    _fsync_dir(root.parent)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()
