"""Worker hosts in network namespaces of their own (tests/multihost.py): one host's link is cut
mid-batch, with a claim in flight; its jobs run on the others, it records none of them, serves
again once its link is back, and every job succeeds once."""

from __future__ import annotations

import pytest

from tests.multihost import HostConfig, run, unavailable


@pytest.mark.timeout(300)
def test_a_host_cut_off_mid_batch_loses_its_jobs_and_every_job_succeeds_once(tmp_path, data_dir, capsys):
    why = unavailable()
    if why is not None:
        pytest.skip(why)
    # the stand-in GPU: a step of 16 jobs takes a host about 0.5 s, and a worker starts in a second
    cfg = HostConfig(jobs=150, deadline=120, model="standin")
    cfg.settings["SDQUEUE_STANDIN_SCALE"] = "20"
    report = run(cfg, tmp_path, data_dir)
    with capsys.disabled():
        print(f"\n{report}")
    assert not report.problems, str(report)
    assert len(report.held_at_cut) >= 2 and report.in_flight and report.served_after_restore
    assert set(report.jobs_by_host) == set(report.hosts)  # every host ran jobs
    # A lease (6 s) and a sweep (2 s); or, for a row the cut host had locked (its claim in flight, or
    # a record of its own it was writing when the link went), until PostgreSQL drops it: ~30 s.
    assert report.recoveries["cut: its jobs taken back from it"] < 60
    assert report.recoveries["cut: the job of its claim in flight claimed elsewhere"] < 60
