from __future__ import annotations

import threading

from core.errors import BadInputError
from core.tasks.jobs import Job, JobState


def test_job_runs_reports_progress_and_returns_its_result():
    step = threading.Event()

    def work(context):
        context.report(1, 4, "first batch")
        step.wait(10)  # hold here so the test can read progress mid-run
        context.report(4, 4, "last batch")
        return "result"

    job = Job(work, "demo")
    while job.snapshot().done < 1:
        job.wait(0.01)
    mid = job.snapshot()
    assert mid.state is JobState.RUNNING and mid.fraction == 0.25 and mid.detail == "first batch"
    step.set()
    assert job.wait(10)
    final = job.snapshot()
    assert final.state is JobState.DONE and job.result == "result" and final.fraction == 1.0
    assert final.rate_per_s is not None and final.eta_s == 0


def test_cancel_is_seen_at_the_next_check_and_drops_the_result():
    checked = threading.Event()
    release = threading.Event()

    def work(context):
        for index in range(1000):
            if index == 1:
                checked.set()
                release.wait(10)
            context.check_cancelled()
            context.report(index + 1, 1000)
        return "should not be kept"

    job = Job(work, "cancel-me")
    checked.wait(10)
    job.cancel()
    release.set()
    assert job.wait(10)
    snapshot = job.snapshot()
    assert snapshot.state is JobState.CANCELLED and job.result is None and snapshot.done == 1


def test_typed_errors_are_kept_and_unexpected_ones_become_messages():
    def bad_input(context):
        raise BadInputError("column 'text' is missing")

    def crash(context):
        raise ZeroDivisionError("boom hf_secret_token_in_a_library_message")

    first, second = Job(bad_input, "typed"), Job(crash, "crash")
    assert first.wait(10) and second.wait(10)
    assert first.snapshot().state is JobState.FAILED and isinstance(first.snapshot().error, BadInputError)
    crashed = second.snapshot()
    assert crashed.state is JobState.FAILED and str(crashed.error) == "crash failed unexpectedly." and "ZeroDivisionError" not in str(crashed.error) and "server log" in crashed.error.remedy
    assert "hf_secret" not in str(crashed.error)  # a library's message never reaches the page
