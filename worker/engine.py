"""The worker's engine: one GPU thread runs batches; a small pool encodes, uploads and records.

Celery task threads claim their jobs and hand them to the engine; the GPU thread takes the next
batch from the batcher, denoises it, and passes the images to the CPU pool, so PNG encoding,
uploads and database writes run beside the next batch's denoising. At most `max_in_flight`
finished batches wait for the pool: beyond that the GPU thread waits (bounded memory).

While it serves (`serve`), the engine holds a lease on every job it has: a heartbeat keeps them,
a job that is no longer ours (cancelled, claimed again) leaves the loop at the next step, and
every upload and record is checked against the lease. Images the object store cannot take wait
in the spool; an outage of the database is waited out. How each job ends is the string its
future resolves to:

    succeeded      its images are stored and recorded
    failed         it failed by itself (JobError): a prompt compel cannot parse, NaN, a bad input
    retry          an unexpected error, charged as a failed attempt: back in the queue
    dead-lettered  that was its last attempt (and it failed on two workers, or on the only one)
    lost           no longer ours: cancelled, or claimed again after our lease expired
    released       given back without charge (shutdown, an outage we stopped waiting out, a fault
                   of this host: see worker/blame.py and worker/quarantine.py)
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from PIL import Image as PILImage

from models import jobs
from models.constants import queue_for, worker_queues
from models.workers import healthy_workers
from models.db import Database
from models.errors import JobError, StorageError
from models.events import Publisher
from models.images import pixel_sha256
from models.logs import about
from models.outage import OutageTooLong, wait_out
from models.registry import model_key
from models.settings import Settings
from models.storage import Storage, object_key_for
from models.tables import Batch, Image, utcnow
from worker import metrics
from worker.backend import Model
from worker.batcher import Batcher, PixelBudget, Work
from worker.blame import host_fault, signature
from worker.encode import encode_png, sha256_of
from worker.inputs import input_orientation
from worker.leases import LeaseKeeper
from worker.loops import Finished, LoopFailed, Loops
from worker.quarantine import Health, probe
from worker.relay import EventRelay
from worker.spool import DiskFull, Spool
from worker.samples import CompatKey, ConditioningCache, Dropped, Sample, StepDone, UnetCall, is_out_of_memory
from worker.status import StatusReporter

log = logging.getLogger(__name__)

# Sends the messages of jobs (to a queue, or this worker's own when None).
Send = Callable[[list[str], "str | None"], None]

# Tests only: a batch holding a sample with this prompt kills its worker process, as a segfault
# or the kernel's OOM killer would.
POISON_ENV = "SDQUEUE_TEST_POISON_PROMPT"


def default_pixel_budget(model: Model) -> int:
    """8 images of 768x768 on an 80 GB card (12.3 GB measured for that batch), scaled by memory;
    on the CPU, what keeps a batch of the tiny model at a few seconds."""
    total = model.device_memory
    if total is not None:
        return max(768 * 768, int(8 * 768 * 768 * total / (80 * 2**30)))
    return 16 * 256 * 256


class Draining(Exception):
    """The worker is shutting down and takes no new job."""


# The state a job's row is left in by each way it ends, which its event announces; "lost" has
# none: whoever took the job (a cancel, another worker, the sweeper) says what it is now.
STATE_AFTER = {"succeeded": "succeeded", "failed": "failed", "dead-lettered": "failed", "retry": "queued",
               "released": "queued"}


@dataclass
class Made:
    """One job's images, encoded: (object key, PNG) each, and the values of their rows."""

    work: Work
    objects: list[tuple[str, bytes]] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)


class Engine:
    def __init__(
        self,
        model: Model,
        db: Database,
        storage: Storage,
        hostname: str,
        *,
        pixel_budget: int,
        window: float,
        bulk_share: int = 4,
        cpu_workers: int = 2,
        max_in_flight: int = 2,
        batching: str = "continuous",
    ):
        self.model = model
        self.db = db
        self.storage = storage
        self.hostname = hostname  # also the owner of its leases: unique per worker process
        self.budget = PixelBudget(pixel_budget)
        self.batcher = Batcher(self.budget, window, bulk_share)
        if batching not in ("continuous", "window"):
            raise ValueError(f"batching={batching!r}: must be continuous or window")
        self.batching = batching
        self.loops = Loops(model, self.budget, bulk_share=bulk_share)
        self.conditioning = ConditioningCache(model)
        self.versions = model.versions()
        self.settings: Settings | None = None
        self.keeper: LeaseKeeper | None = None
        self.spool: Spool | None = None
        self.events: EventRelay | None = None
        self._send: Send | None = None
        self.reporter: StatusReporter | None = None  # publishes what it runs, for `sdqueue top`
        self.images_done = 0  # images stored and recorded since it started
        self.on_gpu: list[Work] = []  # window batching: the batch denoising now
        self._held: dict[str, Work] = {}  # every job this engine holds, until it is settled
        # Claims that are no longer ours: their samples leave the loop. By claim (lease), not job:
        # a job given back and claimed again here holds a new lease, which is not lost.
        self._lost: set[jobs.Lease] = set()
        self.health = Health()  # quarantined or not (worker/quarantine.py)
        # Set by `sdqueue worker` (worker/main.py): stop and resume taking messages from the
        # broker, and exit with a status (SDQUEUE_QUARANTINE_EXIT). None: in-process workers.
        self.pause_consuming: Callable[[], None] | None = None
        self.resume_consuming: Callable[[], None] | None = None
        self.exit_with: Callable[[int], None] | None = None
        self._lock = threading.Lock()
        self._charging = threading.Lock()  # charges and the quarantine they may lead to, in turn
        self._cpu = ThreadPoolExecutor(max_workers=cpu_workers, thread_name_prefix="sdqueue-cpu")
        self._in_flight = threading.BoundedSemaphore(max_in_flight)
        self._stop = threading.Event()
        self._draining = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sdqueue-gpu", daemon=True)
        self._thread.start()

    def serve(self, settings: Settings, send: Send) -> None:
        """Start what a worker serving jobs needs beside the GPU loop: leases, the spool, events."""
        self.settings = settings
        self._send = send
        self.health = Health(settings.quarantine_after, settings.probe_interval)
        self.events = EventRelay(Publisher(settings))
        self.keeper = LeaseKeeper(settings, self.db, self.hostname, self.lose, self.send_forgotten)
        assert settings.spool_dir is not None
        self.spool = Spool.open(settings.spool_dir, settings.spool_max_bytes, self.storage, self.keeper.still_held,
                                give_up_after=settings.outage_timeout, min_free_bytes=settings.spool_min_free_bytes)
        self.reporter = StatusReporter(settings, self)

    @property
    def unet_call(self) -> UnetCall | None:
        """What both kinds of batching call for the UNet: None is the model's own (tests wrap it;
        the compiled one replaces it)."""
        return self.loops.unet_call

    @unet_call.setter
    def unet_call(self, call: UnetCall | None) -> None:
        self.loops.unet_call = call
        for loop in self.loops.loops.values():
            loop.unet_call = call or self.model.unet

    @property
    def draining(self) -> bool:
        return self._draining.is_set()

    @property
    def quarantined(self) -> bool:
        return self.health.quarantined

    # --- what task threads call ------------------------------------------------------------------

    def announce(self, job_id: str, state: str) -> None:
        """Publish that the job is now in `state` (its row says so already)."""
        if self.events is not None:
            self.events.state(job_id, state)

    def hold(self, work: Work) -> None:
        """Keep the lease of a job just claimed alive, from now until it is settled."""
        assert self.keeper is not None, "the engine is not serving"
        with self._lock:
            earlier = self._held.get(work.job_id)
            if earlier is not None and earlier.lease != work.lease:
                # Claimed again: the earlier claim here is no longer ours (its samples leave the loop).
                self._lost.add(earlier.lease)
            self._held[work.job_id] = work
        self.keeper.hold(work.lease)

    def submit(self, work: Work) -> Future:
        """Queue a held job for a batch; its future resolves to how the job ended."""
        if self._stop.is_set() or self._draining.is_set() or self.quarantined:
            self._on_pool(self._give_back, [work])
        elif work.lease in self._lost:
            self.settle(work, "lost")
        else:
            self.batcher.put(work)
        return work.future

    def fail(self, work: Work, error: JobError) -> Future:
        """The job failed by itself before it reached a batch (e.g. its input image is unreadable)."""
        self._on_pool(self._fail, work, error)
        return work.future

    def send_forgotten(self, forgotten: list[tuple[str, str | None]]) -> None:
        """Claims of this worker's that it never held (their commit's answer was lost in an outage),
        given back by the heartbeat: their messages go out again, each to its queue."""
        for queue in sorted({q or "" for _, q in forgotten}):
            self.send_again([job_id for job_id, q in forgotten if (q or "") == queue], queue or None)

    def charge(self, work: Work, exc: BaseException) -> Future:
        """An error of a job before it reached a batch: charged, or given back if the host's."""
        self._on_pool(self._charge, work, exc)
        return work.future

    def give_back(self, work: Work) -> Future:
        self._on_pool(self._give_back, [work])
        return work.future

    def _on_pool(self, action: Callable[..., None], *args: Any) -> None:
        """On the CPU pool; in the caller's thread once the pool has shut down (the engine stops)."""
        try:
            self._cpu.submit(action, *args)
        except RuntimeError:
            action(*args)

    def send_again(self, job_ids: list[str], queue: str | None = None) -> None:
        """Send the messages of queued jobs (given back, or to retry) to `queue` (None: this
        worker's own); a broker outage is left to the sweeper, which finds queued jobs without a
        message."""
        if not job_ids or self._send is None:
            return
        try:
            self._send(job_ids, queue)
        except Exception as exc:
            log.warning("could not send %d message(s) (%s); the sweeper will", len(job_ids), exc)

    def _send_back(self, works: list[Work]) -> None:
        """Each job's message to the queue of its priority: a bulk job given back waits behind
        interactive ones again, where the sweeper looks for its message."""
        if self.settings is None:
            return  # not serving: nothing to send with
        for priority in sorted({w.priority for w in works}):
            self.send_again([w.job_id for w in works if w.priority == priority],
                            queue_for(self.settings.queue, priority, model_key(self.settings.model)))

    # --- leases -----------------------------------------------------------------------------------

    def lose(self, leases: set[jobs.Lease]) -> None:
        """These claims are no longer ours: waiting ones are dropped, running ones leave the loop."""
        with self._lock:
            leases = {lease for lease in leases
                      if lease.job_id in self._held and self._held[lease.job_id].lease == lease}
            self._lost |= leases
        for work in self.batcher.remove_claims(leases):
            self.settle(work, "lost")
        if self.spool is not None:
            self.spool.drop_claims(leases)

    def settle(self, work: Work, outcome: str) -> None:
        with self._lock:
            # Only this claim's: a job sent again may already be held again, by a new claim.
            ours = self._held.get(work.job_id) in (work, None)
            if ours:
                self._held.pop(work.job_id, None)
            self._lost.discard(work.lease)
        if self.keeper is not None and ours:
            self.keeper.forget(work.job_id)
        if work.future.done():
            return
        metrics.ended(outcome)
        log.debug("job %s: %s", work.job_id, outcome, extra=work.about())
        if outcome in STATE_AFTER:
            self.announce(work.job_id, STATE_AFTER[outcome])
        work.future.set_result(outcome)

    def _dropped(self) -> frozenset[str]:
        """The jobs whose samples leave a window batch now (a batch holds one claim of a job)."""
        return frozenset(lease.job_id for lease in self._lost)

    def _outage(self, action: Callable[[], Any], what: str) -> Any:
        timeout = self.settings.outage_timeout if self.settings is not None else 60.0
        return wait_out(action, what, timeout=timeout, stop=self._stop)

    # --- shutdown --------------------------------------------------------------------------------

    def drain(self) -> None:
        """Warm shutdown: take no new job, let the batch in hand finish, give back the jobs that
        wait so that other workers run them at once."""
        self._draining.set()
        with self._lock:
            held = set(self._held)
        waiting = self.batcher.remove(held)
        if waiting:
            log.info("shutdown: giving back %d job(s) not started", len(waiting))
            self._give_back(waiting)

    def abort(self, timeout: float = 10.0) -> None:
        """Stop now: every held job leaves the loop and goes back to the queue, uncharged."""
        self._draining.set()
        with self._lock:
            held = list(self._held.values())
            self._lost |= {w.lease for w in held}
        log.warning("stopping now: giving back %d job(s)", len(held))
        if held:
            self._give_back(held, timeout=timeout)

    def _give_back(self, works: list[Work], timeout: float | None = None) -> None:
        ids = [w.job_id for w in works]
        if timeout is None:
            timeout = self.settings.outage_timeout if self.settings is not None else 60.0
        try:
            released = wait_out(lambda: self._release(ids), "giving jobs back", timeout=timeout)
        except OutageTooLong:
            released = []  # their leases expire and the sweeper gives them to others
        given_back = set(released)
        for work in works:  # settled before they are sent: the next delivery may come back here
            self.settle(work, "released")
        self._send_back([w for w in works if w.job_id in given_back])

    def _release(self, ids: list[str]) -> list[str]:
        with self.db.session() as session:
            return jobs.release(session, self.hostname, ids)

    def stop(self, timeout: float = 60) -> None:
        self._stop.set()
        self._thread.join(timeout)
        self._cpu.shutdown(wait=True)
        if self.spool is not None:
            self.spool.stop()
        with self._lock:
            held = list(self._held.values())
        if held:  # nothing may wait on a stopped engine: what it still holds goes back to the queue
            self._give_back(held, timeout=5)
        if self.keeper is not None:
            self.keeper.stop()
        if self.events is not None:
            self.events.close()
        if self.reporter is not None:
            self.reporter.stop()  # its status leaves the registry

    # --- the GPU thread ---------------------------------------------------------------------

    def _loop(self) -> None:
        if self.batching == "continuous":
            self._continuous()
            return
        while not self._stop.is_set():
            if self.quarantined:
                self._while_quarantined()
                continue
            if self.spool is not None and self.spool.full:
                self._stop.wait(0.2)  # the store is away and the spool (or its disk) is full: take no more work
                continue
            for work in self.batcher.unprepared():
                self._prepare(work)
            batch = []
            for work in self.batcher.take(self._stop, timeout=0.5):
                if work.lease in self._lost:  # lost between the batcher and here
                    self.settle(work, "lost")
                else:
                    batch.append(work)
            if not batch:
                continue
            try:
                self._run(batch)
            except Exception as exc:  # never leave a task thread waiting on a dead engine
                log.exception("engine error")
                for work in batch:
                    if not work.future.done():
                        self._cpu.submit(self._charge, work, exc)

    def _continuous(self) -> None:
        """Continuous batching: at every step boundary, jobs that wait join their loops (an idle
        worker starts one the moment it arrives), cancelled and lost ones leave, one loop makes
        one UNet call, and jobs whose schedules ended go to the CPU pool."""
        loops = self.loops
        while not self._stop.is_set():
            if self.quarantined:
                self._while_quarantined()
                continue
            self._prepare_all(self.batcher.unprepared())
            if self._lost:
                lost = set(self._lost)
                for work in loops.drop(lambda w: w.lease in lost):
                    self.settle(work, "lost")
            taking = self.spool is None or not self.spool.full  # the store is away and the spool (or its disk) full
            if taking:
                admitted = self.batcher.admit(loops.room, wait=0.0 if len(loops) else 0.5, stop=self._stop,
                                              running=len(loops), solo=loops.solo)
                # Suspects say they are on the GPU, all of them before any starts: if the worker
                # dies now, one of this group is the cause.
                for work in self._mark_alone([w for w in admitted if w.alone], True):
                    admitted.remove(work)
                for work in admitted:
                    self._join(work)
            if not len(loops):
                if not taking:
                    self._stop.wait(0.2)
                continue
            try:
                finished, again = loops.step(self.events.progress if self.events is not None else None)
            except LoopFailed as exc:
                self._loop_failed(exc)
                continue
            if loops.last_call is not None:
                metrics.steps(*loops.last_call)
            if again:
                metrics.OUT_OF_MEMORY.inc()
            for work in again:  # out of memory: they start again when there is room
                self.batcher.put(work)
            if finished:
                self._finished(finished)

    def _join(self, work: Work) -> None:
        if work.lease in self._lost:  # lost between the batcher and here
            self.settle(work, "lost")
            return
        poison = os.environ.get(POISON_ENV)
        if poison and any(s.prompt.text == poison for s in work.samples):
            log.critical("%s: a sample's prompt is the poison prompt: this worker process dies now", POISON_ENV)
            os.kill(os.getpid(), signal.SIGKILL)
        if not len(self.loops):
            self.model.reset_peak_memory()
        try:
            ready = self.loops.admit(work)
        except Exception as exc:  # e.g. an input image the loop cannot take: this job alone
            log.exception("job %s could not join its loop", work.job_id, extra=work.about())
            self._cpu.submit(self._charge, work, exc)  # or, a fault of this host: given back
            return
        if ready is not None:  # img2img of strength 0: its input is its image
            self._finished([ready])

    def _loop_failed(self, failure: LoopFailed) -> None:
        """A model call failed: each of its jobs runs again in a loop of its own, and only a job
        that fails alone is charged. A fault of this host is nobody's job: all go back."""
        reason = host_fault(failure.cause)
        if reason is not None:
            self._host_fault(reason, [m.work for m in failure.members])
            return
        if len(failure.members) > 1:
            log.warning("a loop of %d jobs failed (%s): running each job alone", len(failure.members), failure)
            for member in failure.members:
                member.work.isolated = True
                self.submit(member.work)
            return
        work = failure.members[0].work
        log.error("job %s failed in its loop: %s", work.job_id, failure, exc_info=failure.cause,
                  extra=work.about())
        self._cpu.submit(self._charge, work, failure.cause)

    def _finished(self, finished: list[Finished]) -> None:
        """Jobs whose images are made: one record of the run for those that ended in this step,
        then encoding, uploads and rows on the CPU pool."""
        works = [member.work for member, _, _ in finished]
        for work in self._mark_alone([w for w in works if w.alone], False):
            works.remove(work)
        finished = [f for f in finished if f[0].work in works]
        if not finished:
            return
        metrics.on_gpu(time.perf_counter() - member.admitted for member, _, _ in finished)
        first = min(finished, key=lambda f: f[0].admitted)[0]
        key = works[0].key
        peak = self.model.peak_memory()
        size = sum(len(images) for _, images, _ in finished)
        record = self._batch_record(
            f"loop-{key.width}x{key.height}-{works[0].tokens}t", size, len(works),
            seconds=time.perf_counter() - first.admitted, started=first.started_at, peak=peak)
        results = [image for _, images, _ in finished for image in images]
        stats = [shared for _, _, per_image in finished for shared in per_image]
        log.info("loop %s: %d job(s) done, %d image(s)", record.compat_key, len(works), size,
                 extra=about(batch_id=record.id))
        self._in_flight.acquire()  # back-pressure: wait while the pool is behind
        self._cpu.submit(self._finish, works, record, results, stats)

    def _batch_record(self, compat: str, size: int, jobs: int, *, seconds: float, started: Any,
                      peak: int | None) -> Batch:
        """The record of a run of the model (its images point to it): who made them, how."""
        return Batch(
            id=str(uuid.uuid4()), worker=self.hostname, model=self.model.source if self.model.spec.hub_id is None
            else self.model.spec.hub_id, model_revision=self.model.revision, scheduler=self.model.scheduler_name,
            device=self.model.device, dtype=self.model.dtype_name, size=size, versions=self.versions,
            compat_key=compat, jobs=jobs, seconds=seconds, peak_memory_bytes=peak, started_at=started,
        )

    def _prepare_all(self, works: list[Work]) -> None:
        """Text conditioning for the new jobs in one encoder call for all their plain prompts;
        if any prompt fails, each job is prepared by itself, so that only its own job fails."""
        if len(works) > 1:
            try:
                self.conditioning.get([s.prompt for w in works for s in w.samples])
            except Exception:
                pass  # found again below, job by job
        for work in works:
            self._prepare(work)

    def _prepare(self, work: Work) -> None:
        """Text conditioning for a new job (cached by prompt); a prompt compel cannot parse, or
        whose conditioning is not finite, fails its job alone."""
        try:
            work.conditioning = self.conditioning.get([s.prompt for s in work.samples])
            work.tokens = work.conditioning[0].tokens
        except Exception as exc:
            self.batcher.remove({work.job_id})
            if isinstance(exc, JobError):
                self._cpu.submit(self._fail, work, exc)
            else:
                self._cpu.submit(self._charge, work, exc)

    def _run(self, batch: list[Work]) -> None:
        key = batch[0].key
        # Suspects run with their group only, and say so while on the GPU: if the worker dies then,
        # one of them is the cause.
        alone = [w for w in batch if w.alone]
        for work in self._mark_alone(alone, True):
            batch.remove(work)
            alone.remove(work)
        if not batch:
            return
        samples = [s for w in batch for s in w.samples]
        conditioning = [c for w in batch for c in w.conditioning or []]
        poison = os.environ.get(POISON_ENV)
        if poison and any(s.prompt.text == poison for s in samples):
            log.critical("%s: a sample's prompt is the poison prompt: this worker process dies now", POISON_ENV)
            os.kill(os.getpid(), signal.SIGKILL)
        self.model.reset_peak_memory()
        started, clock = utcnow(), time.perf_counter()
        self.on_gpu = batch
        try:
            results = self.generate(key, samples, conditioning, dropped=self._dropped,
                                    step_done=self.events.progress if self.events is not None else None)
        except Exception as exc:
            reason = host_fault(exc)
            if reason is not None:  # not a job's: all go back, uncharged
                self._host_fault(reason, batch)
                return
            if len(batch) > 1:
                # Which job is it? Each runs alone; only the one that fails again is charged.
                log.warning("batch %s of %d jobs failed (%s: %s): running each job alone", key, len(batch),
                            type(exc).__name__, exc)
                for work in batch:
                    if work.lease in self._lost:
                        self.settle(work, "lost")
                    else:
                        self._run([work])
                return
            log.exception("job %s failed in its batch", batch[0].job_id, extra=batch[0].about())
            self._cpu.submit(self._charge, batch[0], exc)
            return
        finally:
            self.on_gpu = []
        seconds = time.perf_counter() - clock
        metrics.on_gpu([seconds] * len(batch))
        if key.steps > key.start_step:  # a mean over the batch's steps, its decode included
            metrics.steps(len(samples), seconds / (key.steps - key.start_step), key.steps - key.start_step)
        self._mark_alone(alone, False)  # those no longer ours are settled; _store skips them
        peak = self.model.peak_memory()
        record = self._batch_record(str(key), len(samples), len(batch), seconds=seconds, started=started, peak=peak)
        log.info("batch %s: %d job(s), %d image(s) in %.2f s", key, len(batch), len(samples), seconds,
                 extra=about(batch_id=record.id))
        self._in_flight.acquire()  # back-pressure: wait while the pool is behind
        self._cpu.submit(self._finish, batch, record, results)

    def _mark_alone(self, works: list[Work], alone: bool) -> list[Work]:
        """Record that these suspects are (or no longer are) on the GPU with their group only, in
        one transaction; returns those that are not ours any more (settled as lost)."""
        if not works or self.settings is None:
            return []
        gone: list[Work] = []

        def mark() -> None:
            gone.clear()
            with self.db.session() as session:
                for work in works:
                    try:  # LeaseLost comes before any change: the transaction carries on
                        jobs.running_alone(session, work.lease, alone)
                    except jobs.LeaseLost as exc:
                        log.info("job %s: %s", work.job_id, exc, extra=work.about())
                        gone.append(work)

        try:
            self._outage(mark, f"marking {len(works)} suspect(s) {'on' if alone else 'off'} the GPU")
        except OutageTooLong as exc:
            log.info("%s", exc)
            gone[:] = works
        for work in gone:
            self.settle(work, "lost")
        return list(gone)

    def generate(
        self, key: CompatKey, samples: list[Sample], conditioning: list[Any], dropped: Dropped | None = None,
        step_done: StepDone | None = None,
    ) -> list[Any]:
        """The batch's images (see batch.SampleResult); out of memory splits it in halves (same
        images) and shrinks the budget."""
        if key.mode in ("img2img", "depth") and key.start_step >= key.steps:
            return [np.asarray(s.init_image.convert("RGB")) for s in samples]  # strength 0 keeps the input
        try:
            return self.model.generate(key, samples, conditioning, self.unet_call, dropped, step_done)
        except Exception as exc:
            if not is_out_of_memory(exc) or len(samples) == 1:
                raise
        self.budget.shrink(key, len(samples) * key.pixels)
        metrics.OUT_OF_MEMORY.inc()
        self.model.free_memory()
        half = len(samples) // 2
        log.warning("out of memory on %d samples of %s: splitting; budget now %d px", len(samples), key,
                    self.budget.for_key(key))
        return self.generate(key, samples[:half], conditioning[:half], dropped, step_done) + self.generate(
            key, samples[half:], conditioning[half:], dropped, step_done
        )

    # --- the CPU pool -------------------------------------------------------------------------

    def _finish(self, batch: list[Work], record: Batch, results: list[Any],
                stats: list[tuple[int, int, float]] | None = None) -> None:
        """Store the jobs' images; the run's record (`record`) is written with the first of them
        to be recorded. `stats`, per image, what it shared in a continuous loop (None: a window
        batch, whose images record their batch position).

        The jobs go through each stage together: encoded, their uploads recorded in one statement,
        uploaded, and recorded as succeeded in one statement. A job the one statement leaves out
        (its lease is lost, it has a webhook, it is not PostgreSQL) takes the general path alone."""
        record.finished_at = utcnow()
        try:
            made: list[Made] = []
            position = 0
            for work in batch:
                mine = results[position : position + len(work.samples)]
                shared = stats[position : position + len(work.samples)] if stats is not None else None
                self._guard(work, lambda: made.append(self._encode(work, record, position, mine, shared)))
                position += len(work.samples)
            made = [m for m in made if m is not None]
            recorded = self._together(made, "recording their uploads", lambda: jobs.record_uploads_now(
                self.db, [(m.work.lease, [key for key, _ in m.objects]) for m in made]))
            uploaded: list[Made] = []
            for m in made if recorded is not None else []:
                self._guard(m.work, lambda: self._upload(m, record, m.work.job_id in recorded) and uploaded.append(m))
            values = {column: getattr(record, column) for column in jobs.BATCH_COLUMNS}
            succeeded = self._together(uploaded, "recording them", lambda: jobs.succeed_now(
                self.db, [(m.work.lease, m.rows) for m in uploaded], values))
            for m in uploaded if succeeded is not None else []:
                self._guard(m.work, lambda: self._record(m.work, m.rows, record, m.work.job_id in succeeded))
            if succeeded is not None:
                self._release_follow_ups([m.work.job_id for m in uploaded])
        finally:
            self._in_flight.release()

    def _release_follow_ups(self, job_ids: list[str]) -> None:
        """The follow-ups waiting on jobs just recorded, queued and sent now rather than at the next
        sweep: one statement a batch. What it cannot do (the database away), the sweeper does."""
        if not job_ids:
            return
        try:
            with self.db.session() as session:
                released = jobs.settle_follow_ups(session, job_ids) if jobs.have_follow_ups(session, job_ids) else {}
        except Exception as exc:  # not the jobs' fault: their follow-ups wait for the sweeper
            log.warning("%d job(s): their follow-ups were not released now (%s); the sweeper will", len(job_ids), exc)
            return
        for queue, released_ids in released.items():
            self.send_again(released_ids, queue)

    def _together(self, made: list[Made], what: str, action: Callable[[], set[str]]) -> set[str] | None:
        """One statement for several jobs: the ids it did (the others take the general path one by
        one); None when the database stayed away past the outage timeout (each job is then
        settled as released: its lease lapses and the sweeper gives it to another worker)."""
        if not made:
            return set()
        try:
            return self._outage(action, f"{len(made)} job(s): {what}")
        except OutageTooLong as exc:
            for m in made:
                self._outlasted(m.work, exc)
            return None
        except Exception:  # whose is unknown: each job alone on the general path, which charges it if its own
            log.exception("%d job(s): %s in one statement failed; one by one instead", len(made), what)
            return set()

    def _guard(self, work: Work, action: Callable[[], None]) -> None:
        """Run one job's step on the pool; whatever goes wrong settles the job, never the pool."""
        try:
            action()
        except jobs.LeaseLost as exc:
            log.info("%s", exc, extra=work.about())
            self.settle(work, "lost")
        except OutageTooLong as exc:
            self._outlasted(work, exc)
        except Exception as exc:
            log.exception("job %s: recording it failed", work.job_id, extra=work.about())
            self._charge(work, exc)

    def _outlasted(self, work: Work, exc: OutageTooLong) -> None:
        """The database stayed away past the outage timeout: the job is released, uncharged."""
        log.error("job %s: %s; its lease will lapse and the sweeper gives it to another worker", work.job_id, exc,
                  extra=work.about())
        self.settle(work, "released")

    def _encode(self, work: Work, batch: Batch, first: int, results: list[Any],
                shared: list[tuple[int, int, float]] | None = None) -> Made | None:
        """One job's PNGs and the values of their rows; None when the job is settled instead
        (no longer ours, or its images are errors)."""
        if work.future.done():  # settled already (no longer ours)
            return None
        if work.lease in self._lost or any(r is None for r in results):
            self.settle(work, "lost")
            return None
        errors = [r for r in results if isinstance(r, JobError)]
        if errors:
            self._fail(work, errors[0])
            return None
        made = Made(work)
        for offset, (sample, pixels) in enumerate(zip(work.samples, results)):
            picture = PILImage.fromarray(pixels)
            if shared is None:  # a window batch: its size and the image's place in it
                batching: dict[str, Any] = {"batch_size": batch.size, "batch_position": first + offset}
            else:
                steps_run, most, mean = shared[offset]
                batching = {"steps_run": steps_run, "shared_max": most, "shared_mean": mean}
            pixel_hash = pixel_sha256(pixels)  # of the array encoded, no decode: ~3 ms at 768x768, 1-2% of the PNG's
            cpu = time.thread_time()
            png = encode_png(picture, self.image_record(work, sample, batch, batching, pixel_hash))
            metrics.PNG_SECONDS.inc(time.thread_time() - cpu)
            key = object_key_for(work.job_id, sample.index, work.lease.token)
            made.objects.append((key, png))
            made.rows.append({
                "index": sample.index, "seed": sample.seed, "object_key": key, "sha256": sha256_of(png),
                "pixel_sha256": pixel_hash, "size_bytes": len(png), "width": picture.width,
                "height": picture.height, "batch_id": batch.id, "batch_size": None, "batch_position": None,
                "steps_run": None, "shared_max": None, "shared_mean": None, **batching,
            })
        return made

    def _upload(self, made: Made, batch: Batch, recorded: bool) -> bool:
        """Upload one job's images (or spool them); True when they are all in the store and the
        job is to be recorded now. `recorded`: its uploads' rows are written already."""
        work, objects, lease = made.work, made.objects, made.work.lease
        # Say what will be uploaded before uploading it: an object never lies unseen in the store.
        if not recorded:
            self._outage(lambda: self._in_session(jobs.record_uploads, lease, [key for key, _ in objects]),
                         f"job {work.job_id}: recording its uploads")
        for done, (key, png) in enumerate(objects):
            if work.lease in self._lost:
                self.settle(work, "lost")
                return False
            try:
                self.storage.put(key, png, content_type="image/png")
            except StorageError as exc:
                assert self.spool is not None, exc
                log.warning("job %s: %s; spooling its images", work.job_id, exc,
                            extra=work.about(batch.id))
                try:
                    self.spool.add(lease, objects[done:],
                                   lambda stored: self._on_pool(self._unspooled, work, made.rows, batch, stored))
                except DiskFull as full:
                    # The host's disk, not the job: back to the queue uncharged; the spool starts
                    # no batch until space returns (what it wrote of this job is deleted).
                    log.error("job %s: %s; given back uncharged", work.job_id, full,
                              extra=work.about(batch.id))
                    self._give_back([work], timeout=10)
                return False
        return True

    def _unspooled(self, work: Work, rows: list[dict[str, Any]], batch: Batch, stored: bool) -> None:
        if stored:
            self._guard(work, lambda: self._record(work, rows, batch))
        elif work.lease in self._lost:
            self.settle(work, "lost")
        else:  # the store stayed away longer than we wait: another attempt makes the images again
            self._give_back([work], timeout=10)

    def _record(self, work: Work, rows: list[dict[str, Any]], batch: Batch, recorded: bool | None = None) -> None:
        """The job succeeded with these images (the values of their rows), made in `batch`.
        `recorded`: whether the one statement of its batch mates recorded it (None: not tried)."""
        values = {column: getattr(batch, column) for column in jobs.BATCH_COLUMNS}

        def record() -> None:
            if recorded is None and jobs.succeed_now(self.db, [(work.lease, rows)], values):
                return
            images = [Image(job_id=work.job_id, **row) for row in rows]
            self._in_session(jobs.succeed, work.lease, images, values)

        if not recorded:
            self._outage(record, f"job {work.job_id}: recording it")
        metrics.IMAGES.inc(len(rows))
        with self._lock:
            self.images_done += len(rows)
        log.info("%s: claim %d recorded %d image(s)", work.label, work.lease.token, len(rows),
                 extra=work.about(batch.id))
        self.health.succeeded()
        self.settle(work, "succeeded")

    def _fail(self, work: Work, error: JobError) -> None:
        log.warning("%s failed: %s", work.label, error, extra=work.about())

        def record_failure() -> None:
            self._outage(lambda: self._in_session(jobs.fail, work.lease, str(error)), f"job {work.job_id}: failing it")
            metrics.failed(error)
            self.settle(work, "failed")

        self._guard(work, record_failure)

    def _charge(self, work: Work, exc: BaseException) -> None:
        """An unexpected error of this job alone: one failed attempt; retried until the last (and
        dead-lettered only once it failed on two workers). A fault of this host is not the job's:
        given back uncharged, and the worker quarantined; so is a run of different jobs failing
        here with the same error while other workers succeed with jobs like them."""
        assert self.settings is not None
        reason = host_fault(exc)
        # One charge at a time: a charge either ends before a quarantine (and is in the run of
        # failures it refunds) or finds the worker quarantined (and charges nothing).
        with self._charging:
            if reason is not None or self.quarantined:  # the host's, or this host is at fault already
                self._host_fault(reason or "", [work])
                return
            streak = self.health.failed(work.job_id, signature(exc))
            if len(streak) >= self.settings.quarantine_after and self._others_succeed(work):
                reason = (f"{len(streak)} different jobs in a row failed here with the same error "
                          f"({signature(exc)}) while other workers succeed with jobs like them")
                self._host_fault(reason, [work])
                self._refund([job_id for job_id in streak if job_id != work.job_id])
                return
            error = f"{type(exc).__name__}: {exc}"[:2000]
            healthy = healthy_workers(self.settings)
            try:
                again = self._outage(
                    lambda: self._in_session(jobs.charge, work.lease, error, self.settings.max_attempts, healthy),
                    f"job {work.job_id}: charging a failed attempt")
            except jobs.LeaseLost:
                self.settle(work, "lost")
                return
            except OutageTooLong:
                self.settle(work, "released")
                return
        metrics.failed(exc)
        log.warning("%s: a failed attempt charged (%s); %s", work.label, error.splitlines()[0],
                    "queued again" if again else "that was its last: dead-lettered", extra=work.about())
        self.settle(work, "retry" if again else "dead-lettered")
        if again:  # after settling: the next delivery may come back to this worker
            self._send_back([work])

    # --- quarantine (worker/quarantine.py) ------------------------------------------------------

    def _host_fault(self, reason: str, works: list[Work]) -> None:
        """A fault of this host: these jobs go back to their queues uncharged, and the worker stops
        taking work until a probe passes (or exits, per SDQUEUE_QUARANTINE_EXIT)."""
        features = {}
        if works:
            params = works[0].params
            features = {"mode": works[0].key.mode, "use_compel": bool(params.get("use_compel")),
                        "negative": bool(params.get("negative_prompt"))}
        self._quarantine(reason, features)
        self._on_pool(self._give_back, works)

    def _quarantine(self, reason: str, features: dict[str, Any]) -> None:
        if not self.health.enter(reason, features):
            return  # quarantined already: the first reason stands, logged once
        settings = self.settings
        exit_status = settings.quarantine_exit if settings is not None else 0
        with self._lock:
            held = len(self._held)
        log.error("quarantined: %s. This worker gives back the %d job(s) it holds, uncharged, and takes no "
                  "work %s", reason, held,
                  f"(it exits with status {exit_status})" if exit_status and self.exit_with is not None
                  else f"until a probe passes (first in {self.health.probe_interval:g} s)")
        if self.pause_consuming is not None:
            try:
                self.pause_consuming()
            except Exception as exc:  # it still hands every message back unclaimed
                log.warning("could not stop consuming: %s", exc)
        # What waits or runs here goes back from the GPU thread's next turn (_while_quarantined).
        if exit_status and self.exit_with is not None:
            self.exit_with(exit_status)

    def _while_quarantined(self) -> None:
        """The GPU thread in quarantine: what is in the loops goes back; the probe when it is due."""
        lost: list[Work] = []
        if len(self.loops):
            lost = self.loops.drop(lambda work: True)
        with self._lock:
            held_ids = set(self._held)
        waiting = self.batcher.remove(held_ids)
        if lost or waiting:
            self._on_pool(self._give_back, lost + waiting)
        if not self.health.probe_due() or self._draining.is_set():
            self._stop.wait(0.2)
            return
        state = self.health.state
        try:
            self.probe(state.features if state is not None else {})
        except Exception as exc:
            wait = self.health.probe_failed()
            log.warning("quarantine: probe %d failed (%s); next in %.0f s",
                        state.probes if state is not None else 0, host_fault(exc) or signature(exc), wait)
            return
        ended = self.health.leave()
        log.warning("quarantine over after %.0f s: the probe passed; taking work again",
                    time.time() - ended.since if ended is not None else 0.0)
        if self.resume_consuming is not None:
            try:
                self.resume_consuming()
            except Exception as exc:
                log.warning("could not resume consuming: %s", exc)

    def probe(self, features: dict[str, Any]) -> None:
        """A short known job with the features of the one that failed, through this engine's model
        (worker/quarantine.py `probe`): raises when this host still cannot run it."""
        probe(self.model, self.generate, features)

    def _others_succeed(self, work: Work) -> bool:
        """Whether other workers of this deployment (its queues) recorded jobs like this one (same
        mode) in the last 10 minutes."""
        queues = worker_queues(self.settings.queue, model_key(self.settings.model)) if self.settings is not None else []
        try:
            with self.db.session() as session:
                return jobs.others_succeeded(session, self.hostname, work.key.mode, queues, minutes=10)
        except Exception as exc:  # the database is away: no verdict now
            log.debug("others' successes not read: %s", exc)
            return False

    def _refund(self, job_ids: list[str]) -> None:
        """Take back the attempts this worker charged to jobs for what turned out to be its host."""
        if not job_ids:
            return
        try:
            with self.db.session() as session:
                jobs.refund(session, job_ids, self.hostname)
        except Exception as exc:
            log.warning("could not refund %d job(s) charged here: %s", len(job_ids), exc)

    def _in_session(self, action: Callable[..., Any], *args: Any) -> Any:
        with self.db.session() as session:
            return action(session, *args)

    def image_record(self, work: Work, sample: Sample, batch: Batch, batching: dict[str, Any],
                     pixel_hash: str | None = None) -> dict[str, Any]:
        """Everything needed to make this image again, and the hash of the pixels a re-made one is
        compared with (they do not depend on this record); embedded in its PNG."""
        return {
            **work.params,
            "job_id": work.job_id,
            "index": sample.index,
            "seed": sample.seed,
            "mode": work.key.mode,
            "input_sha256": work.input_sha256,
            "mask_sha256": work.mask_sha256,  # inpainting: the mask's file as uploaded
            "depth_sha256": work.depth_sha256,  # depth-to-image: the caller's map's file as uploaded (None: estimated)
            "input_orientation": input_orientation(sample.init_image),  # the EXIF turn applied to it
            "model": self.model.spec.name,
            "model_source": batch.model,
            "model_revision": self.model.revision,
            "scheduler": self.model.scheduler_name,
            "scheduler_config": self.model.scheduler_config,
            "device": self.model.device,
            "dtype": self.model.dtype_name,
            "batch_id": batch.id,
            **batching,
            "compat_key": batch.compat_key,
            "versions": self.versions,
            "pixel_sha256": pixel_hash,
        }
