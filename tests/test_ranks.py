"""The multi-process launcher of the gloo tests: a crash is retried once, a Python error never."""

from __future__ import annotations

import os
import signal

import pytest

from _ranks import run_ranks


def _abort_once(rank, world, marker):
    if rank == 1 and not os.path.exists(marker):
        open(marker, "w").close()
        os.write(2, b"about to abort\n")
        os.kill(os.getpid(), signal.SIGABRT)


def _count_and_fail(rank, world, marker):
    with open(marker, "a") as f:
        f.write(f"{rank}\n")
    raise ValueError(f"rank {rank} fails")


def test_a_crash_is_retried_once_and_its_stderr_shown(tmp_path):
    marker = str(tmp_path / "crashed")
    with pytest.warns(UserWarning, match=r"(?s)exited with code -6.*about to abort"):
        run_ranks(_abort_once, 2, marker, timeout=120)
    assert os.path.exists(marker)


def test_a_python_error_fails_at_once(tmp_path):
    marker = str(tmp_path / "runs")
    resets = []
    with pytest.raises(AssertionError, match="rank 0 fails") as e:
        run_ranks(_count_and_fail, 2, marker, timeout=120, reset=lambda: resets.append(1))
    assert "rank 1 fails" in str(e.value) and "run 2" not in str(e.value)
    assert sorted(open(marker).read().split()) == ["0", "1"] and not resets
