"""Files the CLI writes for a user: a run's rejects, an export, fetched images.

Two promises. A command never writes over one of its inputs, nor over a file that exists, unless
given --force, and it says so before it starts (`check_output`), not after a run was enqueued.
And a file is there whole or not at all: each is written to a temporary file beside its final
name and renamed into place, so a full disk (ENOSPC, EDQUOT), a read-only one (EROFS) or a
failing one (EIO) ends in one line, `OutputFailed`, with no half file left; `Outputs.undo`
removes whatever else the command made before it failed.
"""

from __future__ import annotations

import os
import stat
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from models.errors import BadDestination, SdqueueError


class OutputFailed(SdqueueError):
    """The destination failed while being written (disk full, read-only, I/O error). What this
    command had made there was removed."""


def check_output(path: Path, *, force: bool = False, inputs: Iterable[Path] = ()) -> Path:
    """`path` (symbolic links followed) as a file this command may write, or BadDestination:
    it is one of `inputs` (even with `force`), a folder or a device, an existing file (unless
    `force`), or its folder is missing or not writable."""
    where = f"output {str(path)!r}"
    target = Path(os.path.realpath(path))
    for source in inputs:
        if os.path.realpath(source) == str(target) or _same_file(source, target):
            raise BadDestination(f"{where} is the input {str(source)!r}: give another path")
    try:
        info = target.stat()
    except FileNotFoundError:
        info = None
    except OSError as exc:
        raise BadDestination(f"{where} cannot be checked ({exc.strerror or exc})") from None
    if info is not None:
        if not stat.S_ISREG(info.st_mode):
            kind = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file"
            raise BadDestination(f"{where} is {kind}: give a file name")
        if not force:
            raise BadDestination(f"{where} exists (--force writes over it)")
    folder = target.parent
    if not folder.is_dir():
        raise BadDestination(f"{where}: its folder {str(folder)!r} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise BadDestination(f"{where}: its folder {str(folder)!r} is not writable")
    return target


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)  # a hard link is the same file under another name
    except OSError:
        return False


def failure(exc: OSError, what: str) -> OutputFailed:
    """One line for an OSError of the destination: what failed, and why."""
    why = exc.strerror or " ".join(str(exc).split()) or type(exc).__name__
    return OutputFailed(f"{what}: {why}")


class Outputs:
    """The files and folders one command makes. `file` writes one whole or not at all; `undo`
    removes every file and folder made so far (a file written over with `force` stays: it is
    whole, and the old one is gone either way). Safe to use from several threads."""

    def __init__(self, *, force: bool = False):
        self.force = force
        self._files: list[Path] = []
        self._folders: list[Path] = []
        self._lock = threading.Lock()
        mask = os.umask(0)
        os.umask(mask)
        self._mode = 0o666 & ~mask  # what open() would give: mkstemp's files are 0600

    def folder(self, path: Path) -> Path:
        """Make `path` and its missing parents (remembered for `undo`); BadDestination when it
        cannot be made or written to."""
        where = f"destination {str(path)!r}"
        missing = []
        for parent in [path, *path.parents]:
            if parent.exists() or parent.is_symlink():
                break
            missing.append(parent)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise BadDestination(f"{where} exists and is not a folder") from None
        except OSError as exc:
            raise BadDestination(f"{where} cannot be created ({exc.strerror or exc})") from None
        finally:
            with self._lock:
                self._folders += [folder for folder in reversed(missing) if folder.is_dir()]
        if not os.access(path, os.W_OK | os.X_OK):
            raise BadDestination(f"{where} is not a writable folder")
        return path

    def temporary(self, path: Path) -> Path:
        """A new empty file beside `path` to build it in (then `place` it, or remove it)."""
        try:
            fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        except OSError as exc:
            raise failure(exc, f"cannot write {path}") from None
        try:
            os.fchmod(fd, self._mode)
        finally:
            os.close(fd)
        return Path(name)

    def place(self, part: Path, path: Path) -> None:
        """The whole file `part` becomes `path`: never over an existing file unless `force`
        (BadDestination); an OSError becomes OutputFailed."""
        try:
            with open(part, "rb+") as f:  # on the disk before it gets its name: a late ENOSPC shows here
                os.fsync(f.fileno())
            existed = self.force and path.exists()
            if self.force:
                os.replace(part, path)
            else:
                try:  # a link fails if `path` exists, even one made a moment ago by someone else
                    os.link(part, path)
                except FileExistsError:
                    raise BadDestination(f"output {str(path)!r} exists (--force writes over it)") from None
                except OSError:  # a filesystem without hard links
                    if path.exists() or path.is_symlink():
                        raise BadDestination(f"output {str(path)!r} exists (--force writes over it)") from None
                    os.rename(part, path)
                part.unlink(missing_ok=True)
        except OSError as exc:
            raise failure(exc, f"cannot write {path}") from None
        if not existed:
            with self._lock:
                self._files.append(path)

    @contextmanager
    def file(self, path: Path) -> Iterator[Path]:
        """A new empty temporary file beside `path` to write; when the block ends without error it
        becomes `path`, and otherwise it is removed. An OSError in the block becomes OutputFailed."""
        part = self.temporary(path)
        try:
            yield part
            self.place(part, path)
        except OSError as exc:
            raise failure(exc, f"cannot write {path}") from None
        finally:
            part.unlink(missing_ok=True)

    def write_bytes(self, path: Path, data: bytes) -> None:
        with self.file(path) as part:
            part.write_bytes(data)

    @contextmanager
    def all_or_nothing(self, what: str) -> Iterator[None]:
        """Around a command's writes: on any failure, `undo`; an OutputFailed then says that `what`
        (e.g. "the images this fetch wrote") were removed."""
        try:
            yield
        except OutputFailed as exc:
            self.undo()
            raise OutputFailed(f"{exc}; {what} were removed") from None
        except BaseException:
            self.undo()
            raise

    def undo(self) -> None:
        """Remove the files, then the (then empty) folders, made so far."""
        with self._lock:
            files, folders = self._files[::-1], self._folders[::-1]
            self._files, self._folders = [], []
        for path in files:
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass
        for folder in folders:
            try:
                folder.rmdir()
            except OSError:  # not empty: something else put a file there
                pass


@contextmanager
def output_file(path: Path, *, force: bool = False) -> Iterator[Path]:
    """One file written whole or not at all, as `Outputs.file` (path checked by `check_output`)."""
    with Outputs(force=force).file(path) as part:
        yield part
