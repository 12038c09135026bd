"""The HTTP API: a FastAPI app that submits jobs, reads them, streams their events and hands out
their images, for many callers at once, each with an API key of its own.

    app.py          create_app(settings): the app, its middleware and the shared backend
    errors.py       the one place where errors become HTTP answers (4xx, 503 with Retry-After)
    bodies.py       reading a request body within its bound; JSON or multipart into fields
    schemas.py      what the OpenAPI document says of bodies and answers
    keys.py         API keys: made, listed, revoked (`sdqueue keys`); tokens kept as sha256
    auth.py         the caller of a request: its key, from `Authorization: Bearer TOKEN`
    limits.py       per-key rate limit (Redis), cap on queued jobs (a lock on the key), cap on open streams
    idempotency.py  `Idempotency-Key`: one answer per key, given again to a retry
    admit.py        writing a validated submit: inputs stored, cap counted and rows inserted at once, sent
    jobs.py         /v1/jobs routes: submit, batch, read, list, images, cancel
    runs.py         /v1/runs routes: a manifest or grid uploaded as a run; list, show, cancel, retry, export
    events.py       /v1/jobs/{id}/events: Server-Sent Events of a job's state and progress
    health.py       /healthz and /readyz
    docs.py         /docs (Swagger UI) and /redoc (ReDoc), their scripts served from the installed package
    dashboard.py    the web dashboard at `/` (templates/): queues, workers, runs, galleries, jobs
    panels.py       what the dashboard's pages show, read from the database, broker and registry
    metrics.py      /metrics: jobs, queues and webhooks for Prometheus, and the API's requests
    serve.py        `sdqueue api`: uvicorn

It imports no worker code: it reaches the database, the broker and storage through models/ and
producer.client.Client, like the CLI.
"""

from producer.api.app import create_app

__all__ = ["create_app"]
