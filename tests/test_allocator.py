"""Training processes run on jemalloc when the machine has it (one re-exec, same pid), glibc when asked or absent."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from seq2seq.allocator import ENV_CHOICE, ONEDNN_CACHE_CAPACITY, ONEDNN_CACHE_ENV, find_jemalloc

PROBE = (
    "import os, sys; from seq2seq.allocator import use_jemalloc, active_allocator; "
    "pid = os.getpid(); use_jemalloc(); print(pid, os.getpid(), active_allocator(), sys.argv[1:])"
)


def _probe(choice: str | None, preload: str | None = None) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in (ENV_CHOICE, "LD_PRELOAD")}
    if choice is not None:
        env[ENV_CHOICE] = choice
    if preload is not None:
        env["LD_PRELOAD"] = preload
    return subprocess.run([sys.executable, "-c", PROBE, "a", "b=c"], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(find_jemalloc() is None, reason="libjemalloc2 is not installed (apt-get install libjemalloc2)")
def test_jemalloc_is_preloaded_by_one_reexec_with_the_same_pid_and_arguments():
    result = _probe(None)
    assert result.returncode == 0, result.stderr
    before, after, allocator, args = result.stdout.split(" ", 3)
    assert before == after and allocator == "jemalloc" and args.strip() == "['a', 'b=c']"


def test_system_choice_keeps_glibc():
    result = _probe("system")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split(" ", 3)[2] == "glibc"


def test_unknown_choice_is_one_line_and_exit_2():
    result = _probe("tcmalloc")
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {ENV_CHOICE}='tcmalloc' must be jemalloc or system"


@pytest.mark.skipif(find_jemalloc() is None, reason="libjemalloc2 is not installed (apt-get install libjemalloc2)")
def test_an_allocator_the_user_preloads_is_not_overridden(tmp_path):
    """LD_PRELOAD naming another allocator: no re-exec and no jemalloc put before it (the loader ignores the missing
    file, so the process stays on glibc, which shows that jemalloc was not slipped in)."""
    user_choice = str(tmp_path / "libtcmalloc_minimal.so.4")
    result = _probe(None, preload=user_choice)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split(" ", 3)[2] == "glibc"
    env_probe = "import os; from seq2seq.allocator import use_jemalloc; use_jemalloc(); print(os.environ['LD_PRELOAD'])"
    env = {key: value for key, value in os.environ.items() if key != ENV_CHOICE}
    shown = subprocess.run([sys.executable, "-c", env_probe], env={**env, "LD_PRELOAD": user_choice},
                           capture_output=True, text=True, timeout=60)
    assert shown.stdout.strip() == user_choice


@pytest.mark.parametrize("user_value", [None, "1024"])
def test_the_onednn_primitive_cache_is_capped_across_the_reexec_unless_the_user_set_it(user_value):
    """An uncapped cache holds a primitive for each of the many shapes validation decoding builds (docs/results.md)."""
    probe = ("import os; from seq2seq.allocator import prepare_memory, active_allocator; prepare_memory(); "
             f"print(active_allocator(), os.environ['{ONEDNN_CACHE_ENV}'])")
    env = {key: value for key, value in os.environ.items() if key not in (ENV_CHOICE, "LD_PRELOAD", ONEDNN_CACHE_ENV)}
    if user_value is not None:
        env[ONEDNN_CACHE_ENV] = user_value
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    allocator, capacity = result.stdout.split()
    assert capacity == (user_value or str(ONEDNN_CACHE_CAPACITY))
    assert allocator == ("jemalloc" if find_jemalloc() else "glibc")
