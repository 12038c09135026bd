"""Job messages in bulk: Celery task messages pushed straight into kombu's Redis lists, pipelined.

`send_task` builds a Redis client per message and waits for each push: about 1.2 ms a job, 11
minutes for a run of 100,000. Here each message is Celery's own (protocol 2: the headers Celery's
`as_task_v2` makes, with only the ids changed), wrapped as kombu's Redis transport wraps it, and
a batch of them goes in one LPUSH per queue through one connection. A worker cannot tell them
from what `send_task` sends. Messages carry only job ids; the job rows are written first.

A message carries one job (task `sdqueue.generate`, the job id as its task id) or, sent with
`per_message` > 1, up to that many (task `sdqueue.generate_many`, a task id of its own, the job ids
as its argument and in its `sdqueue_jobs` header).
"""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any, Sequence

from models.constants import GENERATE_MANY_TASK, GENERATE_TASK, JOBS_HEADER

# kombu's Redis transport: the separator of its binding entries (and of its priority lists).
_SEP = "\x06\x16"
# The third element of a protocol-2 body: no callbacks, errbacks, chain or chord.
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


class BulkPublisher:
    """One Redis connection that sends job messages in batches."""

    def __init__(self, sender: Any, broker_url: str):
        import redis

        self._redis = redis.Redis.from_url(broker_url, socket_timeout=30, socket_connect_timeout=10)
        # Celery's own headers for each task, made once; each message copies them with its ids.
        self._headers: dict[str, dict[str, Any]] = {
            task: sender.amqp.as_task_v2("template", task, args=["template"]).headers
            for task in (GENERATE_TASK, GENERATE_MANY_TASK)}
        self._declared: set[str] = set()

    def message(self, job_ids: Sequence[str], queue: str) -> bytes:
        """The message of `job_ids` (one job, or several) on `queue`, as kombu's Redis transport stores it."""
        if len(job_ids) == 1:
            task_id, args = job_ids[0], [job_ids[0]]
            headers = {**self._headers[GENERATE_TASK], "id": task_id, "root_id": task_id, "argsrepr": repr(args)}
        else:
            task_id, args = str(uuid.uuid4()), [list(job_ids)]
            headers = {**self._headers[GENERATE_MANY_TASK], "id": task_id, "root_id": task_id,
                       "argsrepr": f"[{len(job_ids)} jobs]", JOBS_HEADER: list(job_ids)}
        body = json.dumps([args, {}, _EMBED]).encode()
        return json.dumps({
            "body": base64.b64encode(body).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": headers,
            "properties": {
                "correlation_id": task_id,
                "reply_to": "",
                "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": queue},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
            },
        }).encode()

    def send(self, job_ids: Sequence[str], queue: str, per_message: int = 1) -> None:
        """Push the messages of `job_ids` to `queue`, `per_message` jobs to a message: all of them,
        or an exception (some may have gone: a message sent twice only costs its second delivery a
        look at the database)."""
        if not job_ids:
            return
        pipe = self._redis.pipeline(transaction=False)
        if queue not in self._declared:
            # What kombu's queue declaration writes: tools that list queues (Flower) find it.
            binding = f"{queue}{_SEP}{_SEP}{queue}"
            pipe.sadd(f"_kombu.binding.{queue}", binding)
            pipe.sadd(f"_kombu.binding_permanent.{queue}", binding)
        # Consumers pop from the right: pushing in order on the left keeps the run's order.
        per_message = max(1, per_message)
        pipe.lpush(queue, *(self.message(job_ids[start : start + per_message], queue)
                            for start in range(0, len(job_ids), per_message)))
        pipe.execute()
        self._declared.add(queue)

    def close(self) -> None:
        self._redis.close()
