"""The sweeper inside every worker: models/sweep.py, every `sweep_interval` seconds (jittered, so
that workers started together do not sweep together).

After this process found the database unreachable, or while the database started less than a
lease ago (a restart it may not have seen: its pool reconnects silently), it takes no expired lease
back (models/sweep.py `Sweeper.expiry_wait`): the workers that hold live jobs get one lease's time
to renew them before anyone treats those jobs as orphaned.
"""

from __future__ import annotations

import logging
import random
import threading

from models.settings import Settings
from models.sweep import Sweeper

log = logging.getLogger(__name__)


class PeriodicSweeper:
    def __init__(self, sweeper: Sweeper, settings: Settings):
        self.sweeper = sweeper
        self.settings = settings
        self.reachable = True  # as this sweeper last found the database (it logs an outage once)
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
            left, _ = self.sweeper.expiry_wait()  # a lease after the database came back or started
        except Exception as exc:
            if self.reachable:
                log.warning("sweeper: the database cannot be reached (%s)", exc)
            self.reachable = False
            return
        self.reachable = True
        try:
            self.sweeper.sweep(expire=left <= 0)
        except Exception as exc:
            log.warning("sweeper: %s: %s", type(exc).__name__, exc)
