"""What the CLI's progress bar says while a job's events arrive (client.events.shown_status)."""

from __future__ import annotations

from typing import Any

from trainserve.api.schemas import JobEvent
from trainserve.client.events import shown_status


def event(name: str, **data: Any) -> JobEvent:
    return JobEvent(event=name, id=data.get("epoch", 0), data=data)


def test_the_bar_says_running_once_epochs_advance_even_without_a_running_status() -> None:
    # The stream's first look found the job queued; its next found epochs already done
    # (a fast job, or one re-queued and claimed again between two looks at its row).
    stream = [
        event("status", status="queued", epoch=0),
        event("epoch", epoch=1, train_loss=0.5),
        event("epoch", epoch=2, train_loss=0.4),
        event("status", status="succeeded", epoch=2),
    ]
    shown: str | None = None
    seen = []
    for each in stream:
        shown = shown_status(shown, each)
        seen.append(shown)
    assert seen == ["queued", "running", "running", "succeeded"]


def test_a_status_event_always_wins() -> None:
    assert shown_status("running", event("status", status="queued")) == "queued"  # handed back
    assert shown_status("cancelled", event("epoch", epoch=3)) == "cancelled"
    assert shown_status(None, event("epoch", epoch=1)) == "running"
