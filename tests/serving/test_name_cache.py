"""The name cache that lets a prediction by name (and alias) skip the database: what a
caller gets while an entry is fresh, due a re-check, or forgotten after a move here."""

from __future__ import annotations

import time

from trainserve.serving.predictor import NameCache

KEY = ("moons", "production", None)


def test_a_fresh_entry_answers_and_a_stale_one_sends_one_caller_to_the_database() -> None:
    names = NameCache(revalidate_s=0.05)
    assert names.lookup(KEY) is None  # unknown: this caller resolves it
    names.remember(KEY, "a" * 32, names.generation())
    names.checked(KEY)
    assert names.lookup(KEY) == "a" * 32
    time.sleep(0.06)
    assert names.lookup(KEY) is None  # due a re-check: this caller makes it ...
    assert names.lookup(KEY) == "a" * 32  # ... while the others keep the id they had
    names.remember(KEY, "b" * 32, names.generation())  # the alias moved meanwhile
    names.checked(KEY)
    assert names.lookup(KEY) == "b" * 32


def test_a_move_in_this_process_forgets_the_name_and_a_lookup_begun_before_is_not_kept() -> None:
    names = NameCache(revalidate_s=60)
    names.remember(KEY, "a" * 32, names.generation())
    other = ("wave", None, None)
    names.remember(other, "c" * 32, names.generation())
    before = names.generation()
    names.forget("moons")
    assert names.lookup(KEY) is None
    assert names.lookup(other) == "c" * 32  # other names keep their entries
    names.remember(KEY, "a" * 32, before)  # read before the move: stale, dropped
    assert names.lookup(KEY) is None
