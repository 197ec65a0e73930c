"""Output directories that never destroy what the user did not ask to replace.

Every stage writes its result (a merged model, a task checkpoint) through two steps:

* :func:`check_output` decides, before any work, whether ``target`` may be written: never
  a path that is, contains, or lies inside one of the run's inputs (task models, the base
  model, their enclosing model / task directories), never the working directory or one of
  its parents, and never an existing non-empty path that is not an earlier output of the
  same kind (it holds the stage's ``marker`` file) unless the user passed ``overwrite``.
* :class:`atomic_directory` writes under a hidden temporary sibling and renames it into
  place only when complete. SIGTERM (``timeout``, SLURM preemption, ``docker stop``) is
  turned into ``KeyboardInterrupt`` so the temporary directory is removed as on Ctrl-C;
  debris of killed runs (``.NAME.PID.*.tmp``, ``.NAME.old-PID``) is cleaned up (or, when
  its owner is still running, reported) at the next run to the same path; the directory
  gets the permissions the umask allows, like any ``mkdir``.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Iterable, Optional

#: Marker files of outputs: a directory holding one is an earlier output of that stage.
MERGE_MARKER = "merge.json"
TASK_MARKER = "task.json"
#: Files whose presence makes a directory a model (protected as a whole when one of its
#: files is an input).
_MODEL_DIR_FILES = ("config.json", "adapter_config.json", "task.json", "model.safetensors.index.json")


class OutputError(ValueError):
    """The output path cannot be written as asked; the message names the path and why."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def _real(path) -> Path:
    return Path(os.path.realpath(os.path.expanduser(str(path))))


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def protected_roots(inputs: Iterable) -> list[tuple[Path, str]]:
    """``(real path, what it is)`` of everything a run reads and must never replace.

    An input file inside a model directory (``base/model.safetensors``) protects the whole
    directory; an adapter directory inside a task checkpoint protects the checkpoint.
    """
    roots: list[tuple[Path, str]] = []
    for item in inputs:
        if item is None or not isinstance(item, (str, os.PathLike)) or str(item) == "":
            continue  # in-memory state dicts and readers have no path to protect
        path = _real(item)
        roots.append((path, f"input {item}"))
        parent = path.parent
        if path.is_dir() and (path / "adapter_config.json").is_file() and (parent / TASK_MARKER).is_file():
            roots.append((parent, f"task checkpoint {parent}"))
        elif path.is_file() and any((parent / f).is_file() for f in _MODEL_DIR_FILES):
            roots.append((parent, f"model directory {parent}"))
    return roots


def check_output(target, inputs: Iterable = (), marker: Optional[str] = None, overwrite: bool = False) -> Optional[str]:
    """Refuse an output path that would destroy data; say what an accepted one replaces.

    Returns ``None`` for a new (or empty) path, or a sentence to show the user when an
    earlier output (or, with ``overwrite``, another existing path) will be replaced once the
    new one is complete. Raises :class:`OutputError` before any work otherwise.
    """
    raw = "" if target is None else str(target)
    if raw.strip() == "":
        raise OutputError(repr(raw), "an output path is required (got an empty string)")
    norm = os.path.normpath(raw)
    if norm in (".", "..", os.sep) or norm.endswith(os.sep + "..") or Path(norm).name in ("", ".", ".."):
        raise OutputError(raw, "is not a name a new output can take; name a new directory")
    real = _real(raw)
    cwd = _real(os.getcwd())
    if _within(cwd, real):
        raise OutputError(raw, "is the working directory or one of its parents; name a new directory inside it")
    home = _real("~")
    if real == home or real == Path(real.anchor):
        raise OutputError(raw, "is the home or root directory; name a new directory")
    for root, what in protected_roots(inputs):
        if real == root:
            raise OutputError(raw, f"is the {what}; writing there would destroy it. Choose a new output path")
        if _within(root, real):
            raise OutputError(raw, f"contains the {what}; writing there would destroy it. Choose a new output path")
        if _within(real, root) and root.is_dir():
            raise OutputError(raw, f"lies inside the {what}; write outputs next to inputs, not into them")
    if not os.path.lexists(real):
        return None
    if real.is_dir() and not any(real.iterdir()):
        return None
    if real.is_dir() and marker is not None and (real / marker).is_file():
        return f"replacing the earlier output at {raw} once the new one is complete"
    if overwrite:
        what = "directory" if real.is_dir() else "file"
        return f"replacing the existing {what} {raw} (--overwrite) once the new output is complete"
    kind = f"an earlier output (it has no {marker})" if marker else "an output of this command"
    what = "a non-empty directory" if real.is_dir() else "an existing file"
    raise OutputError(raw, f"is {what} that is not {kind}; refusing to replace it. "
                           "Choose a new path, or pass --overwrite to replace it")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def clean_debris(target, report=None) -> list[str]:
    """Remove what killed runs left next to ``target``; return messages of what was done.

    ``.NAME.PID.*.tmp``: a half-written output; removed when process PID is gone, reported
    when it still runs (a concurrent writer). ``.NAME.old-PID``: an earlier output moved
    aside while being replaced; if the run died before the new output took its place, the
    earlier output is restored, else it is removed.
    """
    target = Path(target)
    parent, name = target.parent, target.name
    messages: list[str] = []
    if not parent.is_dir():
        return messages
    tmp_re = re.compile(rf"^\.{re.escape(name)}\.(?:(\d+)\.)?.*\.tmp$")
    old_re = re.compile(rf"^\.{re.escape(name)}\.old-(\d+)$")
    for entry in sorted(parent.iterdir()):
        m = tmp_re.match(entry.name)
        if m:
            pid = int(m.group(1)) if m.group(1) else None
            if pid is not None and not _pid_alive(pid):
                _remove(entry)
                messages.append(f"removed {entry}, a partial output of an interrupted run (process {pid})")
            elif pid is not None and pid != os.getpid():
                messages.append(f"process {pid} is writing {target} too ({entry}); "
                                "if it finishes first, this run will fail and leave its output")
            elif pid is None:
                messages.append(f"found {entry}, a partial output of an earlier run; remove it if no run is writing {target}")
            continue
        m = old_re.match(entry.name)
        if m and not _pid_alive(int(m.group(1))):
            if not os.path.lexists(target):
                os.rename(entry, target)
                messages.append(f"restored {target} from {entry}: a run was killed while replacing it")
            else:
                _remove(entry)
                messages.append(f"removed {entry}, an earlier output left by an interrupted replacement")
    for msg in messages:
        (report or note)(msg)
    return messages


def note(message: str) -> None:
    """Tell the user what an output step did or will do (stderr, one line)."""
    print(f"note: {message}", file=sys.stderr)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class sigterm_as_interrupt:
    """While active (main thread only), SIGTERM raises ``KeyboardInterrupt`` like SIGINT."""

    def __enter__(self):
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.getsignal(signal.SIGTERM)
            if self.previous in (signal.SIG_DFL, None):
                signal.signal(signal.SIGTERM, self._raise)
            else:
                self.previous = None  # someone installed a handler: respect it
        return self

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt(f"terminated by signal {signum}")

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        return False


class atomic_directory:
    """Write a directory under a temporary name; rename it into place only on success.

    >>> with atomic_directory("ckpt/cars") as tmp:
    ...     (tmp / "task.json").write_text("{}")

    On an exception, Ctrl-C or SIGTERM nothing is left behind; an existing ``target`` (which
    :func:`check_output` accepted) is replaced only after the new directory is complete.
    If another process creates ``target`` meanwhile, this run's output is discarded and an
    :class:`OutputError` says so. Call :func:`check_output` first: this class does not
    decide what may be replaced.
    """

    _UNCHECKED = object()

    def __init__(self, target, report=None, expect=_UNCHECKED):
        """``expect``: :func:`output_identity` of ``target`` when :func:`check_output` accepted
        it; if something else sits there when writing starts, this run stops before writing."""
        self.target = Path(target)
        self.report = report
        self.expect = expect

    def __enter__(self) -> Path:
        parent = self.target.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(parent, f"cannot create the output's parent directory ({e.strerror})") from None
        clean_debris(self.target, self.report)
        self._before = output_identity(self.target)  # what check_output accepted replacing
        if self.expect is not atomic_directory._UNCHECKED and self._before != self.expect:
            raise OutputError(self.target, "was created or changed by another process after it was checked; "
                              "nothing was written (check the path and run again)")
        try:
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.{os.getpid()}.", suffix=".tmp", dir=parent))
        except OSError as e:
            raise OutputError(parent, f"cannot write here ({e.strerror})") from None
        os.chmod(self.tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; outputs are for the group too
        self._signals = sigterm_as_interrupt().__enter__()
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                return False
            self._commit()
            return False
        finally:
            self._signals.__exit__(None, None, None)

    def _commit(self) -> None:
        if output_identity(self.target) not in (None, self._before):
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise OutputError(self.target, "another process wrote this output while this run was writing it; "
                              "this run's result was discarded (run it again to replace theirs)")
        old = None
        # Only what check_output accepted is moved aside. With nothing there before, the rename
        # below fails (ENOTEMPTY) if a concurrent writer has just put its output in place.
        if self._before is not None and os.path.lexists(self.target):
            old = self.target.with_name(f".{self.target.name}.old-{os.getpid()}")
            try:
                os.rename(self.target, old)
            except FileNotFoundError:
                old = None  # removed meanwhile
            except BaseException:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise
            if old is not None and output_identity(old) != self._before:  # theirs, renamed in since the check
                os.rename(old, self.target)
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise OutputError(self.target, "another process wrote this output at the same time; "
                                  "this run's result was discarded (run it again to replace theirs)")
        try:
            os.rename(self.tmp, self.target)
        except OSError as e:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if old is not None and not os.path.lexists(self.target):
                os.rename(old, self.target)
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR, errno.ENOTDIR):
                raise OutputError(self.target, "another process wrote this output at the same time; "
                                  "this run's result was discarded (run it again to replace theirs)") from None
            raise OutputError(self.target, f"cannot move the finished output into place ({e.strerror})") from None
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if old is not None and not os.path.lexists(self.target):
                os.rename(old, self.target)
            raise
        if old is not None:
            _remove(old)


def output_identity(path) -> Optional[tuple]:
    """Which file system object sits at ``path`` (``None``: nothing): to notice a change."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns)


def check_free_space(directory, needed_bytes: int) -> None:
    """Refuse to start a write of ``needed_bytes`` that the filesystem says cannot fit."""
    directory = Path(directory)
    probe = directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return  # the filesystem does not report it: the write itself will tell
    if needed_bytes > free:
        raise OutputError(directory, f"needs {_size(needed_bytes)} but only {_size(free)} are free on its filesystem")


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.2f} {unit}"
    return f"{n} bytes"


def check_own_file(path, signature: str, hint: str = "choose another output directory") -> None:
    """Refuse (``OutputError``) an existing ``path`` that does not start with ``signature``: a file a
    command writes next to its results (a report, a table) replaces only an earlier one of its own.
    Call it before the work too, so that a refusal costs nothing."""
    path = Path(path)
    if not path.exists():
        return
    try:
        ours = path.read_text(errors="replace").startswith(signature)
    except OSError:
        ours = False
    if not ours:
        raise OutputError(path, f"exists and was not written by this command; not replaced ({hint})")


def replace_own_file(path, text: str, signature: str, hint: str = "choose another output directory") -> None:
    """Write ``text`` (which starts with ``signature``) to ``path`` atomically, replacing only an
    earlier file of ours (:func:`check_own_file`)."""
    path = Path(path)
    check_own_file(path, signature, hint)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
