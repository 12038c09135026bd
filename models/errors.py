"""Typed errors. Raised where they happen, translated to exit codes / HTTP codes at the edges."""


class SdqueueError(Exception):
    """Base of every error sdqueue raises on purpose; its message is meant for a user."""


class BadInput(SdqueueError):
    """What a user gave cannot be used (a file, a manifest, a schedules file, a run's name):
    nothing was written. The CLI exits 2, as for a bad option."""


class InvalidRequest(SdqueueError, ValueError):
    """A generation request outside the request table's bounds. Nothing was written or enqueued."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid request: " + "; ".join(problems))


class JobNotFound(SdqueueError, LookupError):
    def __init__(self, job_id: str):
        self.job_id = job_id
        super().__init__(f"no job with id {job_id!r}")


class RunNotFound(SdqueueError, LookupError):
    def __init__(self, name: str):
        self.name = name
        super().__init__(f"no run named {name!r} (`sdqueue runs` lists them)")


class BadDestination(SdqueueError, ValueError):
    """A folder to download into that is not a writable folder. Nothing was downloaded."""


class SchemaOutOfDate(SdqueueError):
    """The database is not at the schema revision this code needs."""


class ConfigError(SdqueueError):
    """A setting is missing or invalid."""


class ModelUnavailable(SdqueueError):
    """The requested model weights cannot be found or downloaded."""


class ServiceUnavailable(SdqueueError):
    """The database or the broker cannot be reached."""


class StorageError(SdqueueError):
    """The object store refused or lost an object."""


class StorageUnavailable(StorageError, ServiceUnavailable):
    """The object store cannot be reached (or answers with a server error): an outage, not a
    fault of the job. Uploads wait and retry."""


class JobError(SdqueueError):
    """A job fails by itself in a way another attempt would not mend (a prompt compel cannot
    parse, NaN conditioning, latents or pixels): it fails at once, alone. `reason`, a short name
    of what went wrong, labels the workers' failure metrics."""

    def __init__(self, message: str, reason: str = "job-error"):
        super().__init__(message)
        self.reason = reason


class JobTimeout(SdqueueError, TimeoutError):
    def __init__(self, job_id: str, state: str, timeout: float):
        self.job_id = job_id
        self.state = state
        super().__init__(f"job {job_id} still {state} after {timeout:g} s")


class RunExists(BadInput):
    """`sdqueue run` with the name of a run made from another source or other defaults: nothing
    was written (--append adds to it knowingly)."""


class RunBusy(SdqueueError):
    """A run that cannot be deleted yet: some of its jobs are queued or running."""
