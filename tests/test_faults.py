"""The fault suite's short form (tests/faults.py): real servers and worker processes, real faults."""

from __future__ import annotations

import pytest

from tests.faults import Config, run


@pytest.mark.timeout(900)
def test_fault_suite_short_form(tmp_path, data_dir, capsys):
    report = run(Config.short(), tmp_path, data_dir)
    with capsys.disabled():
        print(f"\n{report}")
    assert not report.problems, str(report)
    assert report.submitted > 100 and report.worker_deaths >= 2  # the kill -9, and the poison job at least once
    # second deliveries of up to 5 running jobs (at least 2 run when they are picked) and 5 queued ones
    assert len(report.cancelled_running) == 3 and 7 <= report.duplicates_sent <= 10
    assert set(report.recoveries) >= {"kill -9: its jobs running again", "Redis restarted empty: queued jobs claimed"}
