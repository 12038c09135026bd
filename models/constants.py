"""Names both sides of the queue must agree on."""

# The Celery task the producer sends by name; the worker registers it under the same name.
GENERATE_TASK = "sdqueue.generate"
# The task of a message that carries several bulk jobs (SDQUEUE_JOBS_PER_MESSAGE); their ids are
# also in the message's JOBS_HEADER, where the sweeper finds them without decoding the body.
GENERATE_MANY_TASK = "sdqueue.generate_many"
JOBS_HEADER = "sdqueue_jobs"
# Default Celery queue; settable (SDQUEUE_QUEUE) so that several deployments can share a broker.
DEFAULT_QUEUE = "sdqueue"
# Bulk jobs (runs) go to a queue of their own beside each queue: a worker consumes both, and
# kombu alternates between them, so a flood of either one never stops the other being fetched.
BULK_SUFFIX = ".bulk"


def queue_for(base: str, priority: str) -> str:
    """The queue a job of `priority` ("interactive" or "bulk") is sent to, for the base queue."""
    return base + BULK_SUFFIX if priority == "bulk" else base


def worker_queues(base: str) -> list[str]:
    """What a worker of the base queue consumes: interactive first, then bulk."""
    return [base, base + BULK_SUFFIX]
