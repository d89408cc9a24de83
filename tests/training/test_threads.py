"""The thread policy (trainserve.training.threads): threads from the work per step and the
cores free, measured from /proc/stat with a real CPU burner; the choice noted on the job."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.small_models import fit, linear, moons, wave
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


def test_the_thread_count_changes_neither_the_weights_nor_the_metrics():
    # 40,000 rows: the split's loss is a mean over more elements than torch's grain
    # (32,768), which torch sums in one part per thread; the step itself (batch 4,096, one
    # output) has no reduction that long. So the weights and, with threads.one_thread, the
    # metrics are the same bit for bit whatever the policy chose.
    x, y = wave(40_000)
    fields: dict[str, Any] = {
        "model": [linear(16), "ReLU", linear(1)],
        "loss": "MSELoss",
        "epochs": 2,
        "batch_size": 4_096,
        "validation_split": 0.1,
    }
    before = torch.get_num_threads()
    try:
        runs = [fit(x, y, **fields, threads=threads.ThreadChoice(n, 0, 2, 2, "test"))[2] for n in (1, 2)]
        assert torch.get_num_threads() == 2  # the run left the count it was given
    finally:
        torch.set_num_threads(before)
    one, two = runs
    for key, value in one.module.state_dict().items():
        assert torch.equal(value, two.module.state_dict()[key]), key
    assert one.metrics == two.metrics
    assert [r.val_loss for r in one.history] == [r.val_loss for r in two.history]
    # What the guard is for: the same mean on two threads differs in its last bits.
    values = torch.from_numpy(np.random.default_rng(0).standard_normal(40_000).astype(np.float32))
    with threads.one_thread():
        single = values.mean().item()
    threads.apply(2)
    try:
        assert torch.get_num_threads() == 2
        split = values.mean().item()
    finally:
        torch.set_num_threads(before)
    assert single != split


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="needs /proc (Linux)")
def test_a_background_sampler_lets_a_job_read_the_load_without_waiting():
    # What a worker does (WorkerContext): sample all along, then choose with wait=None.
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        threads.keep_sampling(0.05)
        threads.keep_sampling(0.05)  # a second call starts nothing more
        assert threads.sampling()
        assert sum(t.name == "load-sampler" for t in threading.enumerate()) == 1
        time.sleep(0.6)  # the burner running through the last windows
        choice = threads.choose(10**12, wait=None)
    finally:
        burner.kill()
        burner.wait()
    assert choice.free <= max(1, threads.allowed_cores() - 1)  # the burner's core is not free
    assert choice.threads == choice.free
