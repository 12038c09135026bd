"""Names both sides of the queue must agree on."""

# The Celery task the producer sends by name; the worker registers it under the same name.
GENERATE_TASK = "sdqueue.generate"
# Default Celery queue; settable (SDQUEUE_QUEUE) so that several deployments can share a broker.
DEFAULT_QUEUE = "sdqueue"
