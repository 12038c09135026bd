"""The sweeper inside every worker: models/sweep.py, every `sweep_interval` seconds (jittered, so
that workers started together do not sweep together).

After this process found the database unreachable, it takes expired leases back only once it has
reached the database again without a break for a whole lease: the workers that hold live jobs get
one lease's time to renew them before anyone treats those jobs as orphaned.
"""

from __future__ import annotations

import logging
import random
import threading
import time

from sqlalchemy import text

from models.settings import Settings
from models.sweep import Sweeper

log = logging.getLogger(__name__)


class PeriodicSweeper:
    def __init__(self, sweeper: Sweeper, settings: Settings):
        self.sweeper = sweeper
        self.settings = settings
        # Since when the database answers without a break; None while it does not.
        self.reachable_since: float | None = float("-inf")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sdqueue-sweeper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(self.settings.sweep_interval * random.uniform(0.8, 1.2)):
            self.sweep_once()

    def sweep_once(self) -> None:
        try:
            with self.sweeper.db.session() as session:
                session.execute(text("SELECT 1"))
        except Exception as exc:
            if self.reachable_since is not None:
                log.warning("sweeper: the database cannot be reached (%s)", exc)
            self.reachable_since = None
            return
        now = time.monotonic()
        if self.reachable_since is None:
            self.reachable_since = now
        settled = now - self.reachable_since >= self.settings.lease_seconds
        try:
            self.sweeper.sweep(expire=settled)
        except Exception as exc:
            log.warning("sweeper: %s: %s", type(exc).__name__, exc)
