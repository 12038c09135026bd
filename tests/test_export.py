"""Export: a run's images as an image folder, WebDataset shards or a Parquet index, on disk or in
S3, read back with the libraries people use (datasets, webdataset, pyarrow)."""

from __future__ import annotations

import gc
import hashlib
import io
import json
import os
import stat
import subprocess
import sys
import tarfile
import uuid
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, select, update

from models.errors import BadDestination, RunNotFound
from models.tables import Batch, Image, Job, JobState, Run, utcnow
from producer.cli import main
from producer.runs.export import COLUMNS, ExportError, export_run
from producer.runs.splits import parse_split
from tests.conftest import BUCKET, small
from tests.servers import s3_client

INDEX = [name for name, _ in COLUMNS]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_run(client, images_per_job: list[int]) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    """A run of one job per entry (that many images each), submitted to the worker and waited for:
    (run name, run id)."""
    name, run_id = f"export-{uuid.uuid4().hex[:8]}", str(uuid.uuid4())
    with client.db.session() as session:
        session.add(Run(id=run_id, name=name, defaults={}, priority="bulk"))
    job_ids = []
    for i, count in enumerate(images_per_job):
        job_id = client.submit(small(prompt=f"a lighthouse at dusk, number {i}", seed=100 + i, num_images=count))
        with client.db.session() as session:
            session.execute(update(Job).where(Job.id == job_id).values(run_id=run_id, run_key=f"row-{i:04d}"))
        job_ids.append(job_id)
    for job_id in job_ids:
        assert client.wait(job_id, timeout=240)["state"] == "succeeded"
    return name, run_id


def add_job_row(client, run_id: str, key: str, state: JobState) -> str:  # type: ignore[no-untyped-def]
    """A job of the run that no worker will see: its row only (no message; a running one holds a
    live lease of another worker, so no sweeper takes it back)."""
    job_id = str(uuid.uuid4())
    running = state is JobState.RUNNING
    with client.db.session() as session:
        session.add(Job(
            id=job_id, state=state.value, mode="txt2img", params=small(prompt="never made", seed=1), seed=1,
            width=256, height=256, num_inference_steps=3, num_images=1, run_id=run_id, run_key=key,
            queue="test-export-nowhere", enqueued_at=utcnow(), priority="bulk",
            lease_owner="elsewhere" if running else None,
            lease_expires_at=utcnow() + timedelta(hours=1) if running else None,
        ))
    return job_id


def stored_images(client, run_id: str) -> dict[str, dict[str, Any]]:  # type: ignore[no-untyped-def]
    """The run's images as the database holds them, by JOBID-INDEX, with their batch's scheduler."""
    with client.db.session() as session:
        rows = session.execute(
            select(Image, Job.run_key, Batch.scheduler, Batch.model_revision, Batch.model)
            .join(Job, Job.id == Image.job_id).outerjoin(Batch, Batch.id == Image.batch_id)
            .where(Job.run_id == run_id)
        ).all()
    return {f"{image.job_id}-{image.index}": {"key": image.object_key, "sha256": image.sha256, "seed": image.seed,
                                             "run_key": run_key, "scheduler": scheduler, "revision": revision,
                                             "source": source, "pixel_sha256": image.pixel_sha256}
            for image, run_key, scheduler, revision, source in rows}


def check_row(row: dict[str, Any], expected: dict[str, Any], run: str) -> None:
    assert row["run"] == run and row["key"] == expected["run_key"]
    assert row["sha256"] == expected["sha256"] and row["seed"] == expected["seed"]
    assert row["scheduler"] == expected["scheduler"] and row["scheduler"]
    assert row["model_revision"] == expected["revision"]
    assert row["mode"] == "txt2img" and row["width"] == row["height"] == 256 and row["num_inference_steps"] == 3
    assert row["model"] and row["prompt"].startswith("a lighthouse at dusk") and row["text"] == row["prompt"]
    # how it was made: the model's reference and the scheduler's config (from the PNG's record)
    assert row["model_source"] == expected["source"] and row["pixel_sha256"] == expected["pixel_sha256"]
    assert "num_train_timesteps" in json.loads(row["scheduler_config"]) and "torch" in json.loads(row["versions"])


def readable(folder: Path) -> None:
    """Every file and folder under `folder` has the mode a plain open() or mkdir() gives (0644, 0755)."""
    mask = os.umask(0)
    os.umask(mask)
    for path in [folder, *folder.rglob("*")]:
        want = (0o777 if path.is_dir() else 0o666) & ~mask
        assert stat.S_IMODE(path.stat().st_mode) == want, path


def test_a_run_exports_as_imagefolder_webdataset_parquet_and_hf(client, settings, worker, tmp_path, capsys):
    import datasets
    import pyarrow.parquet as pq
    import webdataset

    name, run_id = make_run(client, [1, 1, 1, 1, 2, 2])
    add_job_row(client, run_id, "row-failed", JobState.FAILED)
    add_job_row(client, run_id, "row-cancelled", JobState.CANCELLED)
    stored = stored_images(client, run_id)
    assert len(stored) == 8

    # imagefolder: what datasets' imagefolder loader reads, metadata and all
    folder = tmp_path / "imagefolder"
    report = export_run(settings, name, folder, format="imagefolder", concurrency=3)
    assert (report.images, report.jobs, report.left_out) == (8, 6, {"failed": 1, "cancelled": 1})
    lines = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert [line["file_name"] for line in lines] == [f"images/{key}.png" for key in
                                                     (f"{r['job_id']}-{r['image_index']}" for r in lines)]
    assert [line["key"] for line in lines] == sorted(line["key"] for line in lines)  # in run-key order
    loaded = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train", cache_dir=str(tmp_path / "hf"))
    assert len(loaded) == 8 and set(loaded.column_names) == {"image", *INDEX}
    assert loaded[0]["image"].size == (256, 256)
    readable(folder)
    raw = loaded.cast_column("image", datasets.Image(decode=False))
    for row in raw:
        expected = stored[f"{row['job_id']}-{row['image_index']}"]
        check_row(row, expected, name)
        data = row["image"]["bytes"] or Path(row["image"]["path"]).read_bytes()
        assert sha256(data) == expected["sha256"] == sha256(client.storage.get(expected["key"]))
    with pytest.raises(BadDestination, match="already holds an export"):  # never mixed with an older one
        export_run(settings, name, folder, format="imagefolder")

    # webdataset: shards of at most 3 samples, each with its Parquet index beside it
    shards = tmp_path / "wds"
    report = export_run(settings, name, str(shards), format="webdataset", shard_size=3)
    assert (report.images, report.shards) == (8, 3)
    assert sorted(p.name for p in shards.iterdir()) == [f"0000{i}.{ext}" for i in range(3) for ext in ("parquet", "tar")]
    urls = [str(shards / f"0000{i}.tar") for i in range(3)]
    with warnings.catch_warnings():
        # webdataset leaves closing the shard files it opened to the garbage collector
        warnings.simplefilter("ignore", ResourceWarning)
        samples = list(webdataset.WebDataset(urls, shardshuffle=False))
        gc.collect()
    assert len(samples) == 8 and {s["__key__"] for s in samples} == set(stored)
    for sample in samples:
        record = json.loads(sample["json"])
        assert set(record) == set(INDEX) and sample["txt"].decode() == record["prompt"]
        check_row(record, stored[sample["__key__"]], name)
        assert sha256(sample["png"]) == record["sha256"]
    readable(shards)
    with tarfile.open(shards / "00000.tar") as tar:
        assert {member.mode for member in tar.getmembers()} == {0o644}
    loaded = datasets.load_dataset("webdataset", data_files={"train": urls}, split="train", cache_dir=str(tmp_path / "hf"))
    assert len(loaded) == 8 and {"png", "txt", "json"} <= set(loaded.column_names)
    assert {f"{r['job_id']}-{r['image_index']}" for r in loaded["json"]} == set(stored)
    indexes = [pq.read_table(shards / f"0000{i}.parquet").to_pylist() for i in range(3)]
    assert [len(rows) for rows in indexes] == [3, 3, 2]
    assert [f"{r['job_id']}-{r['image_index']}" for rows in indexes for r in rows] == [s["__key__"] for s in samples]

    # parquet, through the command line: the images in datasets' Image layout, one summary line
    capsys.readouterr()
    assert main(["export", name, str(tmp_path / "parquet"), "--format", "parquet", "--concurrency", "2"]) == 0
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) == 1
    assert "exported 8 image(s) of 6 job(s)" in out and str(tmp_path / "parquet") in out
    assert "left out 2 job(s): 1 failed, 1 cancelled" in out
    files = tmp_path / "parquet" / "data"
    assert [p.name for p in files.iterdir()] == ["train-00000-of-00001.parquet"]
    readable(tmp_path / "parquet")
    schema = pq.read_schema(files / "train-00000-of-00001.parquet")
    assert schema.names == ["image", *INDEX]
    about = json.loads(schema.metadata[b"sdqueue"])
    assert about["run"] == name and about["split"] is None
    assert [(m["model_source"], m["scheduler"]) for m in about["models"]] == \
        sorted({(e["source"], e["scheduler"]) for e in stored.values()})
    assert "num_train_timesteps" in about["models"][0]["scheduler_config"]
    loaded = datasets.load_dataset("parquet", data_dir=str(tmp_path / "parquet"), split="train",
                                   cache_dir=str(tmp_path / "hf"))
    assert loaded.column_names == ["image", *INDEX] and len(loaded) == 8
    assert loaded[0]["image"].size == (256, 256) and loaded[0]["text"].startswith("a lighthouse at dusk")
    for row in loaded.cast_column("image", datasets.Image(decode=False)):
        expected = stored[f"{row['job_id']}-{row['image_index']}"]
        check_row(row, expected, name)
        assert sha256(row["image"]["bytes"]) == expected["sha256"]
        assert row["object_uri"] == client.storage.location(expected["key"])

    # hf: what load_from_disk opens, a Dataset
    report = export_run(settings, name, tmp_path / "hf-one", format="hf", shard_size=5)
    assert (report.images, report.shards) == (8, 2)
    assert sorted(p.name for p in (tmp_path / "hf-one").iterdir()) == [
        "data-00000-of-00002.arrow", "data-00001-of-00002.arrow", "dataset_info.json", "state.json"]
    readable(tmp_path / "hf-one")
    one = datasets.load_from_disk(str(tmp_path / "hf-one"))
    assert isinstance(one, datasets.Dataset) and one.column_names == ["image", *INDEX] and len(one) == 8
    assert one[7]["image"].size == (256, 256)
    assert [f"{r['job_id']}-{r['image_index']}" for r in one.remove_columns("image")] == \
        [f"{r['job_id']}-{r['image_index']}" for r in lines]  # in run-key order, as the image folder
    check_row(one.remove_columns("image")[0], stored[f"{one[0]['job_id']}-{one[0]['image_index']}"], name)

    # splits, stable by key: every row in exactly one, the same in every format and export
    split = parse_split("train=0.6,validation=0.4")
    want = {key: split.of(row["run_key"]) for key, row in stored.items()}
    assert set(want.values()) == {"train", "validation"}  # both hold rows (row-0000..row-0005)
    report = export_run(settings, name, tmp_path / "hf-split", format="hf", split="validation=0.4,train=0.6")
    assert report.splits == {name: list(want.values()).count(name) for name in ("train", "validation")}
    both = datasets.load_from_disk(str(tmp_path / "hf-split"))
    assert isinstance(both, datasets.DatasetDict) and set(both) == {"train", "validation"}
    got = {f"{r['job_id']}-{r['image_index']}": s for s in both for r in both[s].remove_columns("image")}
    assert got == want and sum(len(both[s]) for s in both) == 8
    assert both["validation"][0]["image"].size == (256, 256)
    readable(tmp_path / "hf-split")

    export_run(settings, name, tmp_path / "parquet-split", format="parquet", split=split, shard_size=2)
    by_split = datasets.load_dataset("parquet", data_dir=str(tmp_path / "parquet-split"),
                                     cache_dir=str(tmp_path / "hf"))
    assert {f"{r['job_id']}-{r['image_index']}": s for s in by_split
            for r in by_split[s].remove_columns("image")} == want
    names = sorted(p.name for p in (tmp_path / "parquet-split" / "data").iterdir())
    count = {s: -(-list(want.values()).count(s) // 2) for s in ("train", "validation")}
    assert names == [f"{s}-{i:05d}-of-{count[s]:05d}.parquet" for s in ("train", "validation") for i in range(count[s])]
    # written over with fewer files: none of the earlier ones is left to be read with them
    export_run(settings, name, tmp_path / "parquet-split", format="parquet", split=split, force=True)
    assert sorted(p.name for p in (tmp_path / "parquet-split" / "data").iterdir()) == [
        "train-00000-of-00001.parquet", "validation-00000-of-00001.parquet"]

    export_run(settings, name, tmp_path / "folder-split", format="imagefolder", split=split)
    by_split = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "folder-split"),
                                     cache_dir=str(tmp_path / "hf"))
    assert {f"{r['job_id']}-{r['image_index']}": s for s in by_split
            for r in by_split[s].remove_columns("image")} == want
    export_run(settings, name, tmp_path / "wds-split", format="webdataset", split=split)
    assert sorted(p.name for p in (tmp_path / "wds-split").iterdir()) == [
        f"{s}-000000.{ext}" for s in ("train", "validation") for ext in ("parquet", "tar")]
    with tarfile.open(tmp_path / "wds-split" / "validation-000000.tar") as tar:
        assert {m.name.rsplit(".", 1)[0] for m in tar.getmembers()} == {k for k, v in want.items() if v == "validation"}


def test_export_to_s3_and_a_tampered_image_is_refused(client, settings, worker, tmp_path, capsys):
    name, run_id = make_run(client, [2, 1, 1])
    stored = stored_images(client, run_id)
    s3 = s3_client(settings.s3_endpoint_url)
    prefix = f"exports/{uuid.uuid4().hex[:10]}"

    # webdataset shards uploaded whole, with their index
    report = export_run(settings, name, f"s3://{BUCKET}/{prefix}/wds", format="webdataset", shard_size=3)
    assert (report.images, report.shards, report.dest) == (4, 2, f"s3://{BUCKET}/{prefix}/wds")
    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/wds/")["Contents"]
    assert sorted(o["Key"].rsplit("/", 1)[1] for o in listed) == ["00000.parquet", "00000.tar", "00001.parquet",
                                                                  "00001.tar"]
    members: dict[str, bytes] = {}
    for shard in ("00000.tar", "00001.tar"):
        body = s3.get_object(Bucket=BUCKET, Key=f"{prefix}/wds/{shard}")["Body"].read()
        with tarfile.open(fileobj=io.BytesIO(body)) as tar:
            for member in tar.getmembers():
                members[member.name] = tar.extractfile(member).read()  # type: ignore[union-attr]
    assert set(members) == {f"{key}.{ext}" for key in stored for ext in ("png", "txt", "json")}
    for key, expected in stored.items():
        assert sha256(members[f"{key}.png"]) == expected["sha256"]
        assert json.loads(members[f"{key}.json"])["sha256"] == expected["sha256"]

    # imagefolder: one object per image, and the metadata
    export_run(settings, name, f"s3://{BUCKET}/{prefix}/folder", format="imagefolder")
    metadata = s3.get_object(Bucket=BUCKET, Key=f"{prefix}/folder/metadata.jsonl")["Body"].read().decode()
    lines = [json.loads(line) for line in metadata.splitlines()]
    assert len(lines) == 4
    for line in lines:
        data = s3.get_object(Bucket=BUCKET, Key=f"{prefix}/folder/{line['file_name']}")["Body"].read()
        assert sha256(data) == line["sha256"] == stored[f"{line['job_id']}-{line['image_index']}"]["sha256"]

    # parquet shards by split, named once their number is known; a second export there is refused
    report = export_run(settings, name, f"s3://{BUCKET}/{prefix}/parquet", format="parquet",
                        split="train=0.5,test=0.5", shard_size=1)
    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/parquet/")["Contents"]
    assert sorted(o["Key"].split("/parquet/")[1] for o in listed) == sorted(
        f"data/{s}-{i:05d}-of-{m:05d}.parquet" for s, n in report.splits.items() for m in [max(n, 1)] for i in range(m))
    # (a split without rows still has its one, empty, file: it is there for load_dataset)
    with pytest.raises(BadDestination, match=r"already holds an export \(data/\)"):
        export_run(settings, name, f"s3://{BUCKET}/{prefix}/parquet", format="parquet")
    export_run(settings, name, f"s3://{BUCKET}/{prefix}/parquet", format="parquet", force=True)  # and over it
    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/parquet/")["Contents"]
    assert [o["Key"].split("/parquet/")[1] for o in listed] == ["data/train-00000-of-00001.parquet"]

    # an image overwritten in storage: the export stops and names it, with both digests
    victim = next(key for key in stored if key.endswith("-1"))
    job_id = victim.rsplit("-", 1)[0]
    client.storage.put(stored[victim]["key"], b"not the image that was made")
    with pytest.raises(ExportError) as refused:
        export_run(settings, name, tmp_path / "tampered", format="webdataset")
    message = str(refused.value)
    assert f"image 1 of job {job_id}" in message and client.storage.location(stored[victim]["key"]) in message
    assert stored[victim]["sha256"] in message and sha256(b"not the image that was made") in message
    assert not list((tmp_path / "tampered").iterdir())  # the shard that held it was not written, nor left half
    capsys.readouterr()
    assert main(["export", name, str(tmp_path / "tampered-cli"), "--format", "hf"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sdqueue: error: image 1 of job") and len(err.strip().splitlines()) == 1


def test_an_unfinished_run_is_refused_unless_partial(client, settings, worker, tmp_path, capsys):
    name, run_id = make_run(client, [1, 2])
    waiting = [add_job_row(client, run_id, "row-queued", JobState.QUEUED),
               add_job_row(client, run_id, "row-running", JobState.RUNNING)]
    try:
        with pytest.raises(ExportError, match=r"1 queued, 1 running, 2 succeeded.*--partial"):
            export_run(settings, name, tmp_path / "refused", format="parquet")
        assert not (tmp_path / "refused").exists()
        assert main(["export", name, str(tmp_path / "refused"), "--format", "webdataset"]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--partial" in err and "Traceback" not in err

        report = export_run(settings, name, tmp_path / "partial", format="webdataset", partial=True, progress=True)
        assert "3/3" in capsys.readouterr().err  # the progress bar, when asked for
        assert (report.images, report.jobs, report.shards) == (3, 2, 1)
        assert report.left_out == {"queued": 1, "running": 1}
        assert "left out 2 job(s): 1 queued, 1 running" in str(report)
    finally:
        with client.db.session() as session:
            session.execute(delete(Job).where(Job.id.in_(waiting)))


def test_an_unknown_run_is_one_line(settings, tmp_path, capsys):
    with pytest.raises(RunNotFound):
        export_run(settings, "no-such-run", tmp_path / "x", format="parquet")
    assert main(["export", "no-such-run", str(tmp_path / "x"), "--format", "imagefolder"]) == 3
    err = capsys.readouterr().err.strip()
    assert err == "sdqueue: error: no run named 'no-such-run' (`sdqueue runs` lists them)"


@pytest.mark.parametrize("option, message", [
    ("train=0.9", "sum to 0.9: they must sum to 1 (within 1e-9)"),
    ("train=1.0,validation=0", "validation=0: the fraction must be above 0"),
    ("train=0.5,tr-ain=0.5", "split name 'tr-ain'"),
    ("train", "'train' is not NAME=FRACTION"),
    (",".join(f"s{i}=0.1" for i in range(9)), "9 splits: give 1 to 8"),
])
def test_a_bad_split_is_one_line_naming_the_option(settings, tmp_path, capsys, option, message):
    with pytest.raises(SystemExit) as refused:
        main(["export", "any-run", str(tmp_path / "x"), "--format", "parquet", "--split", option])
    assert refused.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sdqueue export: error: argument --split: ") and message in err and "\n" not in err
    with pytest.raises(ExportError, match="^split="):
        export_run(settings, "any-run", tmp_path / "x", format="hf", split=option)
    assert not (tmp_path / "x").exists()


def test_splits_depend_on_the_key_alone():
    split = parse_split("validation=0.5,train=0.5")
    # pinned: the same row lands in the same split on every machine and in every version
    assert "".join(split.of(f"row-{i:04d}")[0] for i in range(12)) == "tttvvvvttttv"
    same = parse_split({"train": 0.5, "validation": 0.5})
    assert parse_split(str(split)).fractions == split.fractions == same.fractions
    assert str(parse_split("b=0.123456789,a=0.876543211")) == "a=0.876543211,b=0.123456789"  # passed on as given
    many = parse_split("train=0.98,validation=0.02")
    counts = [many.of(f"k{i}") for i in range(20000)].count("validation")
    assert 300 < counts < 500  # about 2%


def test_fetches_run_concurrently_a_bounded_window_ahead_and_come_out_in_order():
    import threading
    import time

    from producer.runs.writers import _fetched

    lock, state = threading.Lock(), {"read": 0, "written": 0, "running": 0, "most_running": 0, "most_ahead": 0}

    def rows():  # type: ignore[no-untyped-def]
        for i in range(200):
            with lock:
                state["read"] += 1
                state["most_ahead"] = max(state["most_ahead"], state["read"] - state["written"])
            yield {"n": i}, f"key-{i}"

    def fetch(row: dict[str, Any], key: str) -> bytes:
        with lock:
            state["running"] += 1
            state["most_running"] = max(state["most_running"], state["running"])
        time.sleep(0.001 * (row["n"] % 3))
        with lock:
            state["running"] -= 1
        return key.encode()

    out = []
    for row, data in _fetched(rows(), fetch, concurrency=4):
        state["written"] += 1
        out.append((row["n"], data))
    assert out == [(i, f"key-{i}".encode()) for i in range(200)]
    assert 1 < state["most_running"] <= 4 and state["most_ahead"] <= 2 * 4


def test_the_export_module_imports_light():
    code = ("import sys, producer.runs.export; heavy = {'torch', 'pyarrow', 'tqdm', 'datasets', 'webdataset', "
            "'worker'} & set(sys.modules); assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)
