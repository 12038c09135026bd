"""Runs: named sets of jobs made in bulk, and what becomes of them.

- `manifest`: JSONL, CSV and Parquet manifests and TOML grids, read and validated into rows with
  stable keys, before anything is written.
- `enqueue`: a run's rows into the database in batches and into the broker pipelined; idempotent
  and resumable (`sdqueue run`), and what `sdqueue runs` shows and does.
- `export`: a run's images as a dataset (imagefolder, webdataset, parquet, hf) on disk or in S3;
  `writers`: the four formats; `destination`: the folder or S3 prefix written to; `splits`: its
  rows in named splits, stable by key.
- `schedules`: cron schedules fired by Celery beat, each firing one run, exactly once.
"""
