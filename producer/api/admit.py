"""Writing a submit the API has validated: its inputs stored, the key's cap counted and its rows
inserted in one transaction under a lock on the key, then its messages sent.

This is Client.submit_many's order with the cap inside it: the Client commits its rows in a
transaction of its own, where a count made before could go stale (20 batches of 5 racing past a
cap of 5 queued 65 jobs). Whatever fails after an input was stored takes the input back, so no
object is left that no job names; a broker that cannot be reached takes the rows back too.
"""

from __future__ import annotations

from models.errors import ServiceUnavailable
from models.request import GenerationRequest
from producer.api.app import Backend
from producer.api.auth import Caller
from producer.api.errors import hide_secrets
from producer.api.limits import check_batch_size, check_cap, hold_key
from producer.bulk import by_queue, check_follow_ups, insert_jobs, job_row, send_batches, settle_new_follow_ups


class _Inputs:
    """Stands in for storage while the rows' values are made: job_row's uploads, kept to be done
    once nothing but the cap and the insert is left to refuse the submit."""

    def __init__(self) -> None:
        self.held: list[tuple[str, bytes]] = []

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self.held.append((key, data))


def enqueue(shared: Backend, who: Caller, requests: list[GenerationRequest], *, priority: str,
            webhook_url: str | None, webhook_events: list[str] | None = None) -> list[str]:
    """Record and enqueue validated requests as `who`'s jobs, all or none; their ids in order.
    TooManyRequests (429) over the key's cap, ServiceUnavailable (503) when a service does not
    answer: either way nothing is left written. Blocking: run it in a worker thread."""
    client = shared.client
    # 1. what can be refused before anything is written: a batch the cap never allows, a broker
    #    that no worker would read (memory://)
    check_batch_size(who, len(requests))
    client.sender  # noqa: B018
    requests = check_follow_ups(client.db, requests, shared.settings,
                                None if len(requests) == 1 else [f"requests[{i}]" for i in range(len(requests))])
    # 2. the rows' values, seeds drawn; the inputs kept aside
    inputs = _Inputs()
    values = [job_row(request, settings=shared.settings, priority=priority, storage=inputs,  # type: ignore[arg-type]
                      api_key_id=who.key_id, webhook_url=webhook_url, webhook_events=webhook_events)
              for request in requests]
    single = len(values) == 1
    if single:  # one job is marked sent with its insert (Client.submit's way): one commit less
        values[0]["enqueued_at"] = values[0]["created_at"]
    # 3. the inputs, then count and insert under the key's lock; any failure takes the inputs back
    with client.removing_inputs_on_failure(values):
        for key, data in inputs.held:
            client.storage.put(key, data)
        with client.db.session() as session:
            hold_key(session, who)
            check_cap(session, who, len(values))
            written = insert_jobs(session, values)
            released = settle_new_follow_ups(session, values)
    # 4. the messages (a follow-up's once the job it follows succeeded); rows and inputs taken back
    #    when they cannot be sent
    try:
        if single:
            for queue, job_ids in by_queue(values, written, released).items():
                client.send(job_ids, queue)
        else:
            send_batches(client, by_queue(values, written, released), mark=True)
    except Exception as exc:
        reason = hide_secrets(f"{type(exc).__name__}: {exc}")
        raise ServiceUnavailable(f"the broker cannot be reached ({reason}): {client.take_back(values)}") from exc
    return [value["id"] for value in values]

