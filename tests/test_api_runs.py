"""Runs over HTTP (/v1/runs): a manifest or grid uploaded, idempotent by name and source, listed,
shown, cancelled, retried, exported as a streamed tar or to S3; each run its key's. Against the
real Redis, PostgreSQL and S3 server, served by uvicorn on loopback."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
import uuid
from typing import Any

import httpx
from sqlalchemy import delete, select, update

from producer.api.runs import EXPORT_FOLDER_PREFIX
from tests.conftest import small, wait_for
from tests.test_api import api, bearer, make_key  # noqa: F401  (fixtures)

JSONL = {"Content-Type": "application/x-ndjson"}
SMALL = json.dumps({"width": 256, "height": 256, "num_inference_steps": 2})


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def unique(stem: str) -> str:
    return f"{stem}-{uuid.uuid4().hex[:8]}"


def test_an_upload_makes_a_run_once_and_refuses_what_differs(api, make_key):
    name = unique("lighthouses")
    body = jsonl([{"prompt": f"a lighthouse {i}", "seed": i} for i in range(3)])
    with httpx.Client(base_url=api, headers=bearer(make_key()), timeout=60) as http:
        # 1. JSON Lines as the body: 201, every row a queued job of the run, which holds its source's sha256
        made = http.post("/v1/runs", params={"name": name, "defaults": SMALL}, content=body, headers=JSONL)
        assert made.status_code == 201, made.text
        answer = made.json()
        run = answer["run"]
        assert (answer["created"], answer["written"], answer["rejects"], answer["reject_count"]) == (True, 3, [], 0)
        assert (run["name"], run["state"], run["sealed"], run["expected_jobs"]) == (name, "queued", True, 3)
        assert run["jobs"]["queued"] == 3 and (run["images_done"], run["images_total"]) == (0, 3)
        assert run["source_sha256"] == hashlib.sha256(body).hexdigest() and run["priority"] == "bulk"
        assert run["defaults"] == json.loads(SMALL) and made.headers["location"] == f"/v1/runs/{name}"
        jobs = http.get("/v1/jobs", params={"run": name}).json()["jobs"]
        assert len(jobs) == 3 and {job["params"]["width"] for job in jobs} == {256}
        # 2. the same again: 200, the run as it is, nothing written
        again = http.post("/v1/runs", params={"name": name, "defaults": SMALL}, content=body, headers=JSONL)
        assert again.status_code == 200 and (again.json()["created"], again.json()["written"]) == (False, 0)
        assert again.json()["run"]["id"] == run["id"]
        # 3. another source, or other defaults, under that name: 409 saying which differs
        other = http.post("/v1/runs", params={"name": name, "defaults": SMALL}, content=body + b'{"prompt": "x"}\n',
                          headers=JSONL)
        assert other.status_code == 409 and "its source was" in other.json()["detail"], other.text
        other = http.post("/v1/runs", params={"name": name}, content=body, headers=JSONL)
        assert other.status_code == 409 and "its defaults were" in other.json()["detail"], other.text
        assert http.get(f"/v1/runs/{name}").json()["jobs"]["queued"] == 3
        # 4. bad rows: 422 with the first rejects and their count, nothing written; skip_invalid takes the rest
        bad_name = unique("bad")
        bad = jsonl([{"prompt": "fine"}, {"prompt": "too wide", "width": 500, "key": "w"},
                     {"prompt": "an input", "image": "/etc/hostname"}])
        refused = http.post("/v1/runs", params={"name": bad_name}, content=bad, headers=JSONL)
        assert refused.status_code == 422, refused.text
        refusal = refused.json()
        assert refusal["reject_count"] == 2 and [r["line"] for r in refusal["rejects"]] == [2, 3]
        assert refusal["rejects"][0]["key"] == "w" and refusal["rejects"][0]["errors"][0].startswith("width=500")
        assert "cannot name files" in refusal["rejects"][1]["errors"][0]  # no file of the server is read
        assert http.get(f"/v1/runs/{bad_name}").status_code == 404
        skipped = http.post("/v1/runs", params={"name": bad_name, "skip_invalid": "true"}, content=bad, headers=JSONL)
        assert skipped.status_code == 201 and skipped.json()["written"] == 1 and skipped.json()["reject_count"] == 2
        # 5. a CSV as a form's file part, options as fields; a TOML grid as the body
        form = http.post("/v1/runs", files={"file": ("prompts.csv", b"prompt,seed\na fox,1\na hen,2\n", "text/plain")},
                         data={"name": unique("csv"), "defaults": SMALL})
        assert form.status_code == 201 and form.json()["run"]["expected_jobs"] == 2, form.text
        grid = b'prompts = ["a cat", "a dog"]\nsizes = ["256x256"]\nseeds = [1, 2, 3]\nnum_inference_steps = 2\n'
        made = http.post("/v1/runs", params={"name": unique("grid")}, content=grid,
                         headers={"Content-Type": "application/toml"})
        assert made.status_code == 201 and made.json()["run"]["expected_jobs"] == 6, made.text
        # 6. refusals that name what to change
        checks = [
            ({"name": unique("x")}, {"Content-Type": "application/octet-stream"}, 415, "format="),
            ({}, JSONL, 422, "name is required"),
            ({"name": unique("x"), "defaults": '{"prompt": "x"}'}, JSONL, 422, "defaults.'prompt'"),
            ({"name": unique("x"), "defaults": '{"width": 500}'}, JSONL, 422, "defaults.width=500"),
            ({"name": unique("x"), "skip_invalid": "maybe"}, JSONL, 422, "skip_invalid='maybe'"),
            ({"name": unique("x"), "format": "xlsx"}, JSONL, 422, "format='xlsx'"),
        ]
        for params, headers, code, said in checks:
            answer = http.post("/v1/runs", params=params, content=body, headers=headers)
            assert answer.status_code == code and said in json.dumps(answer.json()["detail"]), (params, answer.text)
        too_big = http.post("/v1/runs", params={"name": unique("big")}, content=b"x" * ((1 << 20) + 1),
                            headers={"Content-Type": "application/toml"})
        assert too_big.status_code == 413 and "1 MiB" in too_big.json()["detail"]


def test_a_run_is_its_keys_and_an_admin_sees_every_run(api, make_key):
    owner, other, admin = (bearer(make_key()), bearer(make_key()), bearer(make_key("--admin")))
    names = [unique("owned"), unique("nightly/owned")]  # a name may hold "/"
    with httpx.Client(base_url=api, timeout=60) as http:
        for name in names:
            made = http.post("/v1/runs", params={"name": name, "defaults": SMALL}, headers={**owner, **JSONL},
                             content=jsonl([{"prompt": f"a boat {i}"} for i in range(2)]))
            assert made.status_code == 201, made.text
        # 1. another key is told the run does not exist, as for a name never used; it cannot take the name
        never_used = unique("never")
        never = http.get(f"/v1/runs/{never_used}", headers=other)
        hidden = http.get(f"/v1/runs/{names[0]}", headers=other)
        assert hidden.status_code == never.status_code == 404
        assert hidden.json()["detail"] == never.json()["detail"].replace(never_used, names[0])
        assert http.post(f"/v1/runs/{names[0]}:cancel", headers=other).status_code == 404
        assert http.get("/v1/jobs", params={"run": names[0]}, headers=other).status_code == 404
        assert http.get(f"/v1/runs/{names[0]}/export", params={"format": "parquet"}, headers=other).status_code == 404
        assert http.get("/v1/runs", headers=other).json() == {"runs": [], "next_cursor": None}
        taken = http.post("/v1/runs", params={"name": names[0]}, headers={**other, **JSONL}, content=b'{"prompt": "x"}')
        assert taken.status_code == 409 and "taken" in taken.json()["detail"], taken.text
        # 2. the owner lists its runs newest first, a page at a time
        first = http.get("/v1/runs", params={"limit": 1}, headers=owner).json()
        assert [run["name"] for run in first["runs"]] == [names[1]] and first["next_cursor"]
        second = http.get("/v1/runs", params={"limit": 1, "cursor": first["next_cursor"]}, headers=owner).json()
        assert [run["name"] for run in second["runs"]] == [names[0]] and second["next_cursor"] is None
        assert http.get(f"/v1/runs/{names[1]}", headers=owner).json()["name"] == names[1]
        assert http.get(f"/v1/runs/{names[1]}/export", params={"format": "parquet"}, headers=owner).status_code == 409
        # 3. an admin key sees it; it has not finished, so it has no dataset yet; the owner cancels it
        assert http.get(f"/v1/runs/{names[0]}", headers=admin).json()["jobs"]["queued"] == 2
        assert names[0] in {run["name"] for run in http.get("/v1/runs", params={"limit": 200}, headers=admin).json()["runs"]}
        unfinished = http.get(f"/v1/runs/{names[0]}/export", params={"format": "parquet"}, headers=owner)
        assert unfinished.status_code == 409 and "has not finished (queued: 2 queued)" in unfinished.json()["detail"]
        bad_state = http.post(f"/v1/runs/{names[0]}:cancel", params={"state": "some"}, headers=owner)
        assert bad_state.status_code == 422 and "state='some'" in bad_state.json()["detail"][0]
        for name in names:
            cancelled = http.post(f"/v1/runs/{name}:cancel", params={"state": "all"}, headers=owner).json()
            assert cancelled["cancelled"] == 2 and cancelled["run"]["state"] == "cancelled"


def test_a_keys_limits_hold_for_runs(api, make_key, settings):
    from tests.test_api import job_count

    rows = jsonl([{"prompt": f"a kite {i}"} for i in range(3)])
    with httpx.Client(base_url=api, timeout=60) as http:
        capped = bearer(make_key("--max-queued", "4"))
        assert http.post("/v1/runs", params={"name": unique("cap")}, headers={**capped, **JSONL},
                         content=rows).status_code == 201
        before = job_count(settings)
        over = http.post("/v1/runs", params={"name": unique("cap")}, headers={**capped, **JSONL}, content=rows)
        assert over.status_code == 429 and "3 queued or running; its cap (max_queued) is 4" in over.json()["detail"]
        never = http.post("/v1/runs", params={"name": unique("cap")}, headers={**capped, **JSONL},
                          content=jsonl([{"prompt": f"a kite {i}"} for i in range(5)]))
        assert never.status_code == 422 and "max_queued of 4" in never.json()["detail"][0]
        assert job_count(settings) == before  # nothing written
        bulk = bearer(make_key("--bulk-only"))
        asked = http.post("/v1/runs", params={"name": unique("b"), "priority": "interactive"}, headers={**bulk, **JSONL},
                          content=rows)
        assert asked.status_code == 422 and "bulk jobs only" in asked.json()["detail"][0]
        row_asked = http.post("/v1/runs", params={"name": unique("b")}, headers={**bulk, **JSONL},
                              content=jsonl([{"prompt": "now", "priority": "interactive"}]))
        assert row_asked.status_code == 422 and row_asked.json()["detail"][0].startswith("line 1: priority")
        limited = bearer(make_key("--rate", "1/min"))
        assert http.post("/v1/runs", params={"name": unique("r")}, headers={**limited, **JSONL},
                         content=rows).status_code == 201
        again = http.post("/v1/runs", params={"name": unique("r")}, headers={**limited, **JSONL}, content=rows)
        assert again.status_code == 429 and "retry-after" in again.headers


def test_a_finished_run_is_retried_and_exported_as_a_tar_and_to_s3(api, make_key, worker, settings):
    from models.db import Database
    from models.tables import Image, Job, Run

    token = bearer(make_key())
    name = unique("export")
    rows = [small(prompt="a red kite", seed=1, num_images=2, num_inference_steps=2),
            small(prompt="a blue kite", seed=2, num_inference_steps=2)]
    with httpx.Client(base_url=api, headers=token, timeout=120) as http:
        assert http.post("/v1/runs", params={"name": name}, content=jsonl(rows), headers=JSONL).status_code == 201
        run = wait_for(lambda: (r := http.get(f"/v1/runs/{name}").json())["state"] == "finished" and r)
        assert (run["images_done"], run["images_total"], run["jobs"]["succeeded"]) == (3, 3, 2)
        # 1. retry: a failed job (made so here: no image, its state) queued again, then made by the worker
        db = Database(settings.database_url)
        try:
            with db.session() as session:
                run_id = session.scalar(select(Run.id).where(Run.name == name))
                job_id = session.scalar(select(Job.id).where(Job.run_id == run_id, Job.seed == 2))
                session.execute(delete(Image).where(Image.job_id == job_id))
                session.execute(update(Job).where(Job.id == job_id).values(state="failed", error="made to fail"))
        finally:
            db.dispose()
        retried = http.post(f"/v1/runs/{name}:retry").json()
        assert retried["retried"] == 1
        wait_for(lambda: http.get(f"/v1/runs/{name}").json()["state"] == "finished")
        # 2. the dataset streamed as a tar of RUN-FORMAT/, its private folder gone afterwards
        assert http.get(f"/v1/runs/{name}/export", params={"format": "mp4"}).status_code == 422
        streamed = http.get(f"/v1/runs/{name}/export", params={"format": "imagefolder"})
        assert streamed.status_code == 200 and streamed.headers["content-type"] == "application/x-tar"
        assert f'filename="{name}-imagefolder.tar"' in streamed.headers["content-disposition"]
        with tarfile.open(fileobj=io.BytesIO(streamed.content)) as tar:
            names = tar.getnames()
            [index] = [n for n in names if n.endswith("metadata.jsonl")]
            metadata = tar.extractfile(index).read().decode().splitlines()
        assert all(n.split("/")[0] == f"{name}-imagefolder" for n in names)
        assert len(metadata) == 3 and sum(n.endswith(".png") for n in names) == 3, names
        assert not [f for f in os.listdir(tempfile.gettempdir()) if f.startswith(EXPORT_FOLDER_PREFIX)]
        # 3. to=s3: written under exports/RUN/FORMAT/ in the bucket, each file's presigned URL fetched
        exported = http.get(f"/v1/runs/{name}/export", params={"format": "parquet", "to": "s3"})
        assert exported.status_code == 200, exported.text
        answer = exported.json()
        assert answer["location"].endswith(f"/exports/{name}/parquet") and answer["images"] == 3
        assert any(file["name"].endswith(".parquet") for file in answer["files"]), answer["files"]
        for file in answer["files"]:
            fetched = httpx.get(file["url"], timeout=30)
            assert fetched.status_code == 200 and len(fetched.content) == file["size_bytes"]
        again = http.get(f"/v1/runs/{name}/export", params={"format": "parquet", "to": "s3"}).json()
        assert [f["name"] for f in again["files"]] == [f["name"] for f in answer["files"]]  # replaced, not doubled
