"""Names both sides of the queue must agree on."""

import hashlib

# The Celery task the producer sends by name; the worker registers it under the same name.
GENERATE_TASK = "sdqueue.generate"
# The task of a message that carries several bulk jobs (SDQUEUE_JOBS_PER_MESSAGE); their ids are
# also in the message's JOBS_HEADER, where the sweeper finds them without decoding the body.
GENERATE_MANY_TASK = "sdqueue.generate_many"
JOBS_HEADER = "sdqueue_jobs"
# Default Celery queue; settable (SDQUEUE_QUEUE) so that several deployments can share a broker.
# Each model has its own queues under it (`sdqueue.sd21`, `sdqueue.sd21-inpainting`, ...): only the
# workers that pin a model consume its queues.
DEFAULT_QUEUE = "sdqueue"
# Bulk jobs (runs) go to a queue of their own beside each queue: a worker consumes both, and
# kombu alternates between them, so a flood of either one never stops the other being fetched.
BULK_SUFFIX = ".bulk"


def model_route(model: str) -> str:
    """A model's part of its queues' names: a registry name as it is; a folder (its absolute path)
    as `folder-` and the first 12 hex digits of the path's sha256."""
    if model.startswith("/"):
        return "folder-" + hashlib.sha256(model.encode()).hexdigest()[:12]
    return model


def queue_for(base: str, priority: str, model: str) -> str:
    """The queue a job of `priority` ("interactive" or "bulk") for `model` is sent to."""
    queue = f"{base}.{model_route(model)}"
    return queue + BULK_SUFFIX if priority == "bulk" else queue


def worker_queues(base: str, model: str) -> list[str]:
    """What a worker pinning `model` consumes: its interactive queue first, then its bulk one."""
    return [queue_for(base, "interactive", model), queue_for(base, "bulk", model)]
