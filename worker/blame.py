"""Whose fault is an error: the job's, or the host's?

A job pays (an attempt charged, in the end a dead letter) only for what its own input does: a
prompt compel cannot parse, conditioning that is not finite, an unreadable input image, or an
error nobody could place. A fault of the host it ran on is never charged to it: the job goes
back to its queue as it was, and the worker stops taking work (worker/quarantine.py). In a GPU
fleet such hosts are an everyday event:

- a broken image: ImportError, and any error raised while a module was being imported;
- the GPU or its driver: CUDA, cuBLAS, cuDNN and NCCL errors, device-side asserts, illegal
  memory accesses, ECC errors, a driver that is gone;
- out of memory on the GPU that persists with the job alone (the engine splits batches and
  sheds loop members first, so one that reaches here ran alone), and MemoryError of the host;
- the disk or the system: no space left, a quota, a read-only or failing filesystem, no file
  descriptors left;
- a model file that fails to load (safetensors, torch's unpickler).
"""

from __future__ import annotations

import errno
from typing import Iterator

from models.errors import JobError

# Errors of the operating system that say the host, not the job, is broken.
HOST_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only filesystem",
    errno.EIO: "input/output error",
    errno.ENOMEM: "out of memory",
    errno.EMFILE: "too many open files",
    errno.ENFILE: "too many open files in the system",
    errno.ENODEV: "no such device",
}

# Words of torch's and the driver's messages that name a fault of the device.
DEVICE_WORDS = (
    "cuda error", "cuda driver", "cublas_status", "cublas error", "cudnn_status", "cudnn error", "nccl error",
    "device-side assert", "illegal memory access", "illegal instruction", "unspecified launch failure",
    "no kernel image is available", "found no nvidia driver", "nvidia driver on your system is too old",
    "ecc error", "uncorrectable", "gpu is lost", "cuda-capable device", "hip error", "xpu error",
)

# Classes of errors (by name, so this module needs none of their packages) of a model file that
# cannot be read.
MODEL_FILE_ERRORS = {"SafetensorError", "UnpicklingError"}


def host_fault(exc: BaseException) -> str | None:
    """A one-line reason when `exc` (or an error it was raised from) is a fault of the host, else
    None: the job's own, or nobody's known (charged, as before)."""
    if isinstance(exc, JobError):
        return None
    for error in _chain(exc):
        reason = _host_reason(error)
        if reason is not None:
            return f"{reason} ({_one_line(error)})"
    return None


def signature(exc: BaseException) -> str:
    """What makes two errors "the same error": the class and the first line of the message,
    without the job's own ids or numbers that would tell repeats apart."""
    text = _one_line(exc)
    return "".join("#" if ch.isdigit() else ch for ch in text)[:200]


def _host_reason(error: BaseException) -> str | None:
    from worker.samples import is_out_of_memory

    if isinstance(error, ImportError):
        return "a module cannot be imported"
    if _raised_while_importing(error):
        return "a module failed while it was imported"
    if isinstance(error, MemoryError):
        return "the host is out of memory"
    if isinstance(error, OSError) and error.errno in HOST_ERRNOS:
        return HOST_ERRNOS[error.errno]
    if type(error).__name__ in MODEL_FILE_ERRORS:
        return "a model file cannot be read"
    text = str(error).lower()
    if is_out_of_memory(error):
        return "out of GPU memory with the job alone"
    if any(word in text for word in DEVICE_WORDS) or type(error).__name__ in ("AcceleratorError", "CudaError"):
        return "the GPU or its driver failed"
    return None


def _raised_while_importing(error: BaseException) -> bool:
    """Whether the error came out of an import (a module that raises when it loads)."""
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.startswith("<frozen importlib._bootstrap"):
            return True
        tb = tb.tb_next
    return False


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, then what it was raised from or during, once each."""
    seen: set[int] = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]
