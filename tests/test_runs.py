"""Run folders and the life of a run: runs started together never share a folder, one process writes a run at a
time, a rejected launch leaves the runs it points at untouched, an interrupt keeps the work, and file-system
failures are one line."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from seq2seq.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from seq2seq.training.lifecycle import RunFolderError, RunLock, remove_stale_temporaries

from conftest import Workspace

TINY = ["model=tiny_transformer", "trainer.time_limit_minutes=null", "trainer.test_beam_size=1",
        "trainer.valid_max_sentences=5", "trainer.num_attention_samples=0", "attention_examples=[]"]


def files_digest(folder: Path) -> dict[str, str]:
    return {str(path.relative_to(folder)): hashlib.sha1(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def run_folders(ws: Workspace) -> list[Path]:
    return sorted(path for path in (ws.root / "runs").glob("*/*/*") if path.is_dir())


@pytest.fixture(scope="module")
def finished_run(ws) -> Path:
    result = ws.train(*TINY, "trainer.max_steps=10", "trainer.eval_every=5", f"hydra.run.dir={ws.root / 'done'}")
    assert result.returncode == 0, result.stderr[-3000:]
    return ws.root / "done"


@pytest.mark.slow
@pytest.mark.corpus
def test_two_runs_started_together_get_two_folders(ws):
    first = ws.popen(*TINY, "trainer.max_steps=2", "trainer.eval_every=2", "optim.lr=1e-3")
    second = ws.popen(*TINY, "trainer.max_steps=2", "trainer.eval_every=2", "optim.lr=5e-3")
    assert first.wait(timeout=600) == 0 and second.wait(timeout=600) == 0
    folders = run_folders(ws)
    assert len(folders) == 2
    lrs = sorted((folder / ".hydra" / "config.yaml").read_text().split("lr: ")[1].split()[0] for folder in folders)
    assert lrs == ["0.001", "0.005"]
    for folder in folders:
        assert (folder / "checkpoints" / "last.pt").is_file() and (folder / "train.log").is_file()


def test_a_second_process_cannot_take_a_run_in_use(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from seq2seq.training.lifecycle import RunLock; "
         "lock = RunLock(Path(sys.argv[1])); lock.record_holder(); print('locked', flush=True); time.sleep(60)",
         str(tmp_path)], stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderError, match=f"is in use by pid {holder.pid}"):
            RunLock(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    RunLock(tmp_path).release()  # the lock died with its process: no stale lock after kill -9


@pytest.mark.slow
@pytest.mark.corpus
def test_a_mismatched_resume_leaves_the_run_untouched(ws, finished_run):
    before = files_digest(finished_run)
    result = ws.train("model=tiny_bahdanau", f"trainer.resume={finished_run / 'checkpoints' / 'last.pt'}")
    assert result.returncode == 2
    message = result.stderr.strip().splitlines()[-1]
    assert "model.name differs (checkpoint: transformer, this run: bahdanau)" in message and len(message) < 400
    assert "Traceback" not in result.stderr
    assert files_digest(finished_run) == before
    assert not (ws.root / "runs" / "tatoeba_zh_en" / "bahdanau").exists()


@pytest.mark.corpus
def test_rejected_configs_and_unwritable_folders_are_one_line_and_leave_no_folder(ws, tmp_path):
    result = ws.train(*TINY, "trainer.max_steps=-1")
    assert result.returncode == 2 and "trainer.max_steps=-1" in result.stderr and "Traceback" not in result.stderr
    assert not run_folders(ws) or all(any(folder.iterdir()) for folder in run_folders(ws))
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for folder in (blocker / "run", Path("/proc/seq2seq_run")):
        result = ws.train(*TINY, f"hydra.run.dir={folder}")
        assert result.returncode == 2, result.stderr[-2000:]
        assert f"cannot create the run folder {folder}" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.corpus
def test_sigint_saves_a_checkpoint_that_resumes_exactly(ws):
    interrupted = ws.root / "interrupted"
    process = subprocess.Popen(
        [sys.executable, "-m", "seq2seq.train", *ws.overrides, *TINY, "trainer.max_steps=100000",
         "trainer.eval_every=100000", f"hydra.run.dir={interrupted}"],
        cwd=ws.root, env=ws.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 300
    while not list(interrupted.glob("events.out.tfevents.*")):  # the writer opens just before the loop
        assert process.poll() is None and time.monotonic() < deadline, "the run did not start training"
        time.sleep(0.1)
    time.sleep(2.0)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGINT, stderr[-3000:]
    saved = load_checkpoint(interrupted / "checkpoints" / "last.pt")
    assert "Traceback" not in stderr and f"stopped training at step {saved['step']}" in stderr
    assert f"trainer.resume={interrupted / 'checkpoints' / 'last.pt'}" in stderr
    end = saved["step"] + 7

    resumed = ws.train(*TINY, f"trainer.max_steps={end}", "trainer.eval_every=100000",
                       f"trainer.resume={interrupted / 'checkpoints' / 'last.pt'}")
    straight = ws.train(*TINY, f"trainer.max_steps={end}", "trainer.eval_every=100000",
                        f"hydra.run.dir={ws.root / 'straight'}")
    assert resumed.returncode == 0 and straight.returncode == 0, resumed.stderr[-2000:] + straight.stderr[-2000:]
    expected = load_checkpoint(ws.root / "straight" / "checkpoints" / "last.pt")["model"]
    actual = load_checkpoint(interrupted / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    launches = (interrupted / ".hydra" / "launches.jsonl").read_text().splitlines()
    assert len(launches) == 2 and "trainer.resume=" in launches[1]  # each launch recorded, none overwritten


def test_stale_temporary_checkpoints_are_removed(tmp_path):
    stale = tmp_path / "checkpoints" / ".last.pt.x1y2.tmp"
    stale.parent.mkdir()
    stale.write_bytes(b"half a checkpoint")
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"whole")
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert not stale.exists() and (tmp_path / "checkpoints" / "last.pt").exists()


def test_a_full_disk_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(3)}})
    good = path.read_bytes()

    def full_disk(payload, handle):
        handle.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match="No space left on device; the previous last.pt is intact"):
        save_checkpoint(path, {"model": {"w": torch.zeros(3)}})
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind
