"""Progress: the terminal display (nested stages, bars fed by loops) and the same progress in Prefect's run log."""
from __future__ import annotations

import io

import pytest
from rich.console import Console

from sftcurate.infra import progress
from sftcurate.infra.stages import Built
from sftcurate.terminal import StageDisplay


def test_stage_display_prints_nested_stages_indented_with_reuse_and_failure():
    buffer = io.StringIO()
    console = Console(file=buffer, width=120, force_terminal=False)
    with StageDisplay(console) as display:
        unsubscribe = progress.subscribe(display.on_event)
        try:
            with progress.stage("uniform@100 select"):
                with progress.stage("ingest"):
                    progress.artifact("examples", "mem://a", reused=True)
                with progress.stage("select"):
                    progress.artifact("selection", "mem://b", reused=False)
                    for i in range(1, 4):
                        progress.step("picks", i, 3, unit="picks")
            with pytest.raises(RuntimeError):
                with progress.stage("finetune"):
                    progress.step("finetune", 1, 10, loss=2.5)
                    raise RuntimeError("boom")
        finally:
            unsubscribe()
    lines = buffer.getvalue().splitlines()
    assert lines[0].startswith("    done ingest") and lines[0].endswith("s, reused)")
    assert lines[1].startswith("    done select") and "reused" not in lines[1]
    assert lines[2].startswith("  done uniform@100 select") and "1 built, 1 reused" in lines[2]
    assert lines[3].startswith("  failed finetune")


def test_step_events_feed_the_innermost_stage_bar():
    console = Console(file=io.StringIO(), width=120)
    display = StageDisplay(console)
    display.on_event("outer", "start", {})
    display.on_event("inner", "start", {})
    display.on_event("finetune", "step", {"step": 3, "steps": 12, "loss": 1.25, "unit": "steps"})
    task = display.progress.tasks[display.rows["inner"]]
    assert (task.completed, task.total) == (3, 12) and task.fields["extra"] == "loss 1.250"
    assert display.progress.tasks[display.rows["outer"]].total is None


@pytest.mark.usefixtures("prefect_harness")
def test_loop_progress_reaches_the_prefect_run_log():
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker
    from prefect.runtime import flow_run

    from sftcurate.tasks.common import call, stage_task

    @stage_task("looping")
    def looping() -> Built:
        for i in range(1, 6):
            progress.step("training", i, 5, loss=1.0 / i)
        return Built("mem://done", reused=False)

    @flow(persist_result=False)
    def loop_flow() -> str:
        call(looping)
        return str(flow_run.id)

    run_id = loop_flow()
    APILogWorker.drain_all(timeout=10)  # the handler sends in batches: the lines must be in the API first
    with get_client(sync_client=True) as client:
        logs = [entry.message for entry in client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))]
    assert any(m.startswith("training: 1/5 steps") for m in logs), logs  # the first step, then every 15 s
    assert "training: 5/5 steps, loss 0.2000" in logs  # and the end of the loop
