"""Files a user names: opened only if they are regular files, read only up to a stated bound.

A path can name a device (/dev/zero never ends), a FIFO (opening one with no writer blocks), a
folder, or a file larger than its size says (/proc, a file still growing). Every file the
producer reads from a user (input images, manifests, grids, prompts files, schedules) goes
through here, so each refusal is one line naming the file and the bound, and no read ever takes
more than the bound plus one byte. Used by the CLI, by manifests and by schedules.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from models.errors import InvalidRequest

# What a refusal calls each kind of file that is not a regular one.
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
# Bytes read at once when streaming.
CHUNK = 1 << 20


class UnreadableFile(ValueError):
    """The file is not a regular file, cannot be read, or is larger than its bound: the message
    says which, in a form that follows the file's name ("is a FIFO, not a regular file")."""


def bound_text(size: int) -> str:
    """A bound as the README writes it: 64 MiB, 20 MiB, 4 GiB."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} bytes"


@contextmanager
def open_regular(path: Path | str, bound: int) -> Iterator[int]:
    """An open descriptor of the regular file at `path`, whose size is within `bound`; the
    checks are of what was opened, so a file swapped after a check cannot slip through."""
    try:
        # O_NONBLOCK: opening a FIFO that has no writer must not hang; a regular file ignores it.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise UnreadableFile(f"cannot be read ({exc.strerror or exc})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = next((name for test, name in _KINDS if test(info.st_mode)), "not a regular file")
            raise UnreadableFile(f"is {kind}, not a regular file")
        if info.st_size > bound:
            raise UnreadableFile(_too_large(info.st_size, bound))
        yield fd
    finally:
        os.close(fd)


def read_bounded(path: Path | str, bound: int) -> bytes:
    """The bytes of a regular file within `bound`: one byte past the bound is the most ever read."""
    with open_regular(path, bound) as fd:
        chunks, size = [], 0
        try:
            while size <= bound and (chunk := os.read(fd, min(CHUNK, bound + 1 - size))):
                chunks.append(chunk)
                size += len(chunk)
        except OSError as exc:
            raise UnreadableFile(f"cannot be read ({exc.strerror or exc})") from None
        if size > bound:
            raise UnreadableFile(_too_large(None, bound))
        return b"".join(chunks)


def stream_bounded(path: Path | str, bound: int, *, chunk: int = CHUNK) -> Iterator[bytes]:
    """The file's bytes in chunks, for files read once from start to end: refused (mid-stream
    too, for one that grows) past `bound`."""
    with open_regular(path, bound) as fd:
        size = 0
        while True:
            try:
                data = os.read(fd, min(chunk, bound + 1 - size))
            except OSError as exc:
                raise UnreadableFile(f"cannot be read ({exc.strerror or exc})") from None
            if not data:
                return
            size += len(data)
            if size > bound:
                raise UnreadableFile(_too_large(None, bound))
            yield data


def _too_large(size: int | None, bound: int) -> str:
    said = f"{size}" if size is not None else f"more than {bound}"
    return f"file of {said} bytes is larger than the bound of {bound} bytes ({bound_text(bound)})"


def read_image_file(path: Path, bound: int | None = None, field: str = "image") -> bytes:
    """The bytes of an input image file within MAX_IMAGE_BYTES, or InvalidRequest naming it."""
    from models.request import MAX_IMAGE_BYTES  # Pillow and pydantic: only when an image is read

    try:
        return read_bounded(path, MAX_IMAGE_BYTES if bound is None else bound)
    except UnreadableFile as exc:
        raise InvalidRequest([f"{field}={str(path)!r}: {exc}"]) from None

