"""A job's Server-Sent Events, read by both clients: the wire format, and where to resume
after the connection breaks off.

The clients own only the sending and the waiting (sync or async); everything they decide
(which event id to resume after, when to give up, how long to back off) is here.
"""

from __future__ import annotations

import json

from trainserve.api.schemas import JobEvent
from trainserve.client import endpoints
from trainserve.client.endpoints import ApiError, Call

# Reconnections in a row, without an event between them, before events() gives up.
RECONNECTS = 5


class EventParser:
    """Server-Sent Events wire format -> JobEvent, one line at a time."""

    def __init__(self) -> None:
        self.fields: dict[str, str] = {}

    def feed(self, line: str) -> JobEvent | None:
        if line == "":
            fields, self.fields = self.fields, {}
            if "data" not in fields:
                return None
            event_id = fields.get("id", "")
            return JobEvent(
                event=fields.get("event", "message"),
                id=int(event_id) if event_id.isdigit() else None,
                data=json.loads(fields["data"]),
            )
        if line.startswith(":"):  # a comment: the server's keep-alive
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data" and "data" in self.fields:
            value = f"{self.fields['data']}\n{value}"
        self.fields[name] = value
        return None


class EventStream:
    """One ``events()`` iteration across its connections: each ``connect()`` asks for the events
    after the last one seen, ``feed`` parses lines, ``broke_off`` says how long to wait before
    connecting again (or gives up)."""

    def __init__(self, job_id: str, last_event_id: int | None) -> None:
        self.job_id = job_id
        self.last_event_id = last_event_id
        self.failures = 0
        self.parser = EventParser()

    def connect(self) -> Call[None]:
        self.parser = EventParser()  # a half-read event of the broken connection is dropped
        return endpoints.events(self.job_id, last_event_id=self.last_event_id)

    def feed(self, line: str) -> JobEvent | None:
        event = self.parser.feed(line)
        if event is not None:
            self.failures = 0
            if event.id is not None:
                self.last_event_id = event.id
        return event

    def broke_off(self) -> float:
        """The stream ended before its ``end`` event: seconds to wait before reconnecting."""
        self.failures += 1
        if self.failures > RECONNECTS:
            raise ApiError(0, f"the event stream of job {self.job_id} kept breaking off")
        return min(2.0, 0.25 * self.failures)


def is_last(event: JobEvent) -> bool:
    return event.event == "end"


def shown_status(shown: str | None, event: JobEvent) -> str | None:
    """The status a progress display shows after ``event``: the status event's own, and
    "running" once epochs arrive while it still says "queued" (or nothing): a job whose
    epochs advance runs, whatever status event the stream sent last (a fast job can go from
    queued to epochs between two looks at its row, or be re-queued and claimed again)."""
    if event.event == "status":
        return str(event.data["status"])
    if event.event == "epoch" and shown in (None, "queued"):
        return "running"
    return shown
