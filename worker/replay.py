"""Replay a recorded batch: the same jobs, in the same positions, through the same function."""

from __future__ import annotations

import numpy as np
from sqlalchemy import select

from models.db import Database
from models.storage import Storage
from models.tables import Image, Job
from worker.samples import compat_key, job_samples
from worker.engine import Engine
from worker.inputs import input_size, prepare_depth_map, prepare_input_image, prepare_mask


def replay_batch(engine: Engine, db: Database, storage: Storage, batch_id: str) -> list[np.ndarray]:
    """The images of batch `batch_id` made again, in batch position order."""
    with db.session() as session:
        rows = session.scalars(select(Image).where(Image.batch_id == batch_id).order_by(Image.batch_position)).all()
        order = list(dict.fromkeys(row.job_id for row in rows))
        found = {job.id: job for job in session.scalars(select(Job).where(Job.id.in_(order)))}
        jobs = [found[job_id] for job_id in order]
    if not jobs:
        raise LookupError(f"no images recorded for batch {batch_id}")
    samples, conditioning = [], []
    for job in jobs:
        init = mask = depth_map = None
        if job.input_key is not None:
            init = prepare_input_image(storage.get(job.input_key), *input_size(job.params))
        if job.mask_key is not None:
            mask = prepare_mask(storage.get(job.mask_key), job.params["width"], job.params["height"])
        if job.depth_key is not None:
            depth_map = prepare_depth_map(storage.get(job.depth_key))
        mine = job_samples(job.id, job.params, job.seed, init, mask, depth=job.mode == "depth", depth_map=depth_map)
        samples += mine
        conditioning += engine.conditioning.get([s.prompt for s in mine])
    key = compat_key(jobs[0].params, img2img=jobs[0].input_key is not None, inpaint=jobs[0].mask_key is not None,
                     depth=jobs[0].mode == "depth")
    return engine.generate(key, samples, conditioning)
