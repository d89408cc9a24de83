"""The thread policy (trainserve.training.threads): threads from the work per step and the
cores free, measured from /proc/stat with a real CPU burner; the choice noted on the job."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.small_models import fit, moons
from trainserve.training import threads


def test_small_steps_take_one_thread_and_large_ones_the_free_cores():
    assert threads.threads_for(256 * 19_458, free=8) == 1  # the medium-batch job
    assert threads.threads_for(4096 * 74_497, free=2) == 2  # the 1M x 32 job, two free cores
    assert threads.threads_for(4096 * 74_497, free=1) == 1  # never more threads than free cores
    assert threads.threads_for(10**12, free=4) == 4
    assert threads.threads_for(0, free=4) == 1


def test_free_cores_leave_out_those_other_processes_keep_busy():
    assert threads.free_cores(0.0, allowed=4) == 4
    assert threads.free_cores(0.3, allowed=4) == 4  # a core mostly idle still counts free
    assert threads.free_cores(1.0, allowed=4) == 3
    assert threads.free_cores(7.5, allowed=4) == 1  # at least one, however busy
    # The other processes may be on cores this one is not allowed to use.
    total = os.cpu_count() or 1
    assert threads.free_cores(float(total - 1), allowed=1) == 1


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="needs /proc (Linux)")
def test_the_sampler_sees_a_burner_and_not_its_own_work():
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        busy = threads.LoadSampler().sample(0.5)
    finally:
        burner.kill()
        burner.wait()
    assert busy >= 0.5  # the burner alone keeps most of a core busy
    # This process spinning is its own use, not another's: it is left out.
    sampler = threads.LoadSampler()
    sampler.latest()
    end = time.monotonic() + 0.4
    while time.monotonic() < end:
        pass
    spinning_here = sampler.latest()
    quiet = threads.LoadSampler().sample(0.4)
    assert spinning_here <= quiet + 0.6


def test_the_setting_overrides_the_policy_and_the_run_notes_the_choice():
    x, y = moons()
    before = torch.get_num_threads()
    try:
        choice = threads.choose(32 * 100, override=1)
        assert (choice.threads, choice.source) == (1, "TRAINSERVE_TRAIN_THREADS")
        result = fit(x, y, epochs=2, threads=choice)[2]
        assert torch.get_num_threads() == 1
        assert "intra-op threads: 1 (set by TRAINSERVE_TRAIN_THREADS)" in result.notes
        chosen = threads.choose(32 * 100, wait=0.05)
        assert chosen.source == "policy"
        assert chosen.threads == 1
        result = fit(x, y, epochs=2, threads=chosen)[2]
        note = next(n for n in result.notes if n.startswith("intra-op threads: 1 (work per step 3,200"))
        assert f"of {threads.allowed_cores()} cores free" in note
    finally:
        torch.set_num_threads(before)
