"""Several processes to the end: torchrun runs (Gloo, two CPU processes) that finish when averaging wins, when
early stopping stops them and when SIGTERM arrives during the final test; collectives that time out naming what
they awaited; batches that run out of memory skipped on every rank alike; best.pt that stays the best.

Training subprocesses get scripted validation scores, stalls and out-of-memory errors from a test-only
`sitecustomize` (HOOK below) put on their PYTHONPATH: the product has no test switch. Every subprocess has a
timeout and is killed with its workers when it overruns, so a hang fails the test instead of the suite.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from seq2seq.checkpoint import load_checkpoint
from seq2seq.data.batching import collate
from seq2seq.config import OptimConfig, model_config
from seq2seq.models import build_model
from seq2seq.training import distributed
from seq2seq.training.optim import build_optimizer, build_scheduler
from seq2seq.training.update import Update, wrap_model

from conftest import TORCHRUN, Workspace, kill_tree

HOOK = '''
"""Test hook for seq2seq's training processes, driven by the JSON in $SEQ2SEQ_TEST_HOOK:
  scores: {"valid@10": {"bleu": 20.0}, "valid_averaged@20": {...}}  metrics that replace the measured ones
  stall_test: {"marker": PATH, "seconds": S}                         touch PATH, then sleep before the test
  out_of_memory: {"calls": [3], "ranks": [0]}                       Update.forward calls that run out of memory
"""
import json
import os


def _out_of_memory_inside(model, call, *args, **kwargs):
    """Run `call` with `model`'s forward raising CUDA's out-of-memory error, as a too-large batch does: inside the
    model, after DDP's forward hooks have run."""
    import torch

    def out_of_memory(*_, **__):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated by the test hook)")

    model.forward = out_of_memory
    try:
        return call(*args, **kwargs)
    finally:
        del model.forward


_HOOK = json.loads(os.environ.get("SEQ2SEQ_TEST_HOOK") or "{}")
if _HOOK:
    import time
    from pathlib import Path

    import torch
    from seq2seq.training import update as _update, validation as _validation

    _validate, _test, _forward = _validation.Evaluator.validate, _validation.Evaluator.test, _update.Update.forward
    _calls = [0]

    def _scripted_validate(self, model, step, *args, **kwargs):
        metrics = _validate(self, model, step, *args, **kwargs)
        prefix = kwargs.get("prefix", args[0] if args else "valid")
        metrics.update(_HOOK.get("scores", {}).get(f"{prefix}@{step}", {}))
        return metrics

    def _stalled_test(self, *args, **kwargs):
        stall = _HOOK.get("stall_test")
        if stall:
            Path(stall["marker"]).touch()
            time.sleep(stall["seconds"])
        return _test(self, *args, **kwargs)

    def _forward_out_of_memory(self, *args, **kwargs):
        _calls[0] += 1
        plan = _HOOK.get("out_of_memory", {})
        if _calls[0] in plan.get("calls", []) and int(os.environ.get("RANK", "0")) in plan.get("ranks", [0]):
            return _out_of_memory_inside(self.model, _forward, self, *args, **kwargs)
        return _forward(self, *args, **kwargs)

    _validation.Evaluator.validate = _scripted_validate
    _validation.Evaluator.test = _stalled_test
    _update.Update.forward = _forward_out_of_memory
'''

QUIET = ["model=tiny_transformer", "trainer.num_attention_samples=0", "attention_examples=[]",
         "trainer.test_beam_size=1", "trainer.valid_max_sentences=10"]
REPLICAS = re.compile(r"replica weights identical on 2 ranks at step (\d+) \(sha1: rank0=(\w+), rank1=(\w+)\)")


@pytest.fixture(scope="module")
def hooked(ws: Workspace, tmp_path_factory) -> Workspace:
    """`ws` whose processes import HOOK at start-up (set SEQ2SEQ_TEST_HOOK per run)."""
    folder = tmp_path_factory.mktemp("hook")
    (folder / "sitecustomize.py").write_text(HOOK)
    path = os.pathsep.join(filter(None, [str(folder), ws.env.get("PYTHONPATH")]))
    return Workspace(ws.root, {**ws.env, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}, ws.overrides)


def launch(ws: Workspace, *args: str, hook: dict | None = None, launcher: list[str] | None = TORCHRUN,
           log: Path) -> subprocess.Popen:
    """Start `seq2seq.train` (by default the README's torchrun command), stdout and stderr into `log`."""
    command = [*(launcher or [sys.executable, "-m"]), "seq2seq.train", *ws.overrides, *args]
    env = {**ws.env, "SEQ2SEQ_TEST_HOOK": json.dumps(hook or {})}
    with open(log, "w", encoding="utf-8") as output:
        return subprocess.Popen(command, cwd=ws.root, env=env, stdout=output, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen, log: Path, timeout: float = 400) -> tuple[int, str]:
    """Wait for a launched run -> (exit status, output); a run still going after `timeout` seconds is killed
    with its workers and fails the test (a hang)."""
    try:
        status = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(process)
        pytest.fail(f"still running after {timeout:.0f} s (a hang?):\n{log.read_text()[-4000:]}")
    return status, log.read_text()


def train(ws: Workspace, *args: str, log: Path, **kwargs) -> tuple[int, str]:
    return finish(launch(ws, *args, log=log, **kwargs), log)


def results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


# ----------------------------------------------------------------------------- the end of a torchrun run


@pytest.mark.slow
@pytest.mark.corpus
def test_torchrun_finishes_when_averaging_wins_and_a_resume_keeps_the_averaged_best(hooked, tmp_path):
    """Averaged weights that beat every validation: the run ends on both ranks, best.pt holds the average and
    last.pt records its score, so a resumed run's worse validation (between the two) does not replace it."""
    run = tmp_path / "run"
    scores = {"valid@10": {"bleu": 10.0}, "valid@20": {"bleu": 20.0}, "valid_averaged@20": {"bleu": 35.0},
              "valid@30": {"bleu": 30.0}, "valid_averaged@30": {"bleu": 5.0}}
    args = [*QUIET, "trainer.eval_every=10", "trainer.average_last=2", f"hydra.run.dir={run}"]
    status, output = train(hooked, *args, "trainer.max_steps=20", hook={"scores": scores}, log=tmp_path / "first.log")
    assert status == 0, output[-4000:]
    step, rank0, rank1 = REPLICAS.search(output).groups()
    assert (step, rank0) == ("20", rank1)
    first = results(run)
    assert first["averaged"] is True and first["best_step"] == 20 and first["world_size"] == 2
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert last["train_state"]["best_bleu"] == 35.0 and last["train_state"]["best_averaged"] is True
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    assert best["metrics"]["averaged_steps"] == [10, 20] and best["metrics"]["bleu"] == 35.0

    status, output = train(hooked, *args, "trainer.max_steps=30", f"trainer.resume={run / 'checkpoints' / 'last.pt'}",
                           hook={"scores": scores}, log=tmp_path / "resumed.log")
    assert status == 0, output[-4000:]
    assert "BLEU 30.00 | chrF" in output and "best BLEU 35.00 (step 20, averaged)" in output
    kept = load_checkpoint(run / "checkpoints" / "best.pt")
    assert kept["metrics"]["averaged_steps"] == [10, 20] and kept["metrics"]["bleu"] == 35.0
    resumed = results(run)
    assert resumed["steps"] == 30 and resumed["best_step"] == 20 and resumed["averaged"] is True


@pytest.mark.slow
@pytest.mark.corpus
def test_torchrun_finishes_after_early_stopping_when_averaging_wins(hooked, tmp_path):
    run = tmp_path / "run"
    scores = {"valid@10": {"bleu": 20.0}, "valid@20": {"bleu": 10.0}, "valid_averaged@20": {"bleu": 35.0}}
    status, output = train(
        hooked, *QUIET, "trainer.max_steps=60", "trainer.eval_every=10", "trainer.patience=1", "trainer.average_last=2",
        f"hydra.run.dir={run}", hook={"scores": scores}, log=tmp_path / "train.log",
    )
    assert status == 0, output[-4000:]
    assert "stopping early (trainer.patience)" in output and REPLICAS.search(output)
    finished = results(run)
    assert finished["stopped_by"] == "patience" and finished["steps"] == 20 and finished["averaged"] is True


@pytest.mark.slow
@pytest.mark.corpus
def test_sigterm_during_the_final_test_stops_every_rank_and_a_resume_does_the_rest(hooked, tmp_path):
    """torchrun forwards SIGTERM to its workers: rank 0 in the test and rank 1 waiting for it both stop at once
    (the checkpoints are all written), and resuming the finished run only averages, tests and writes results."""
    run, marker = tmp_path / "run", tmp_path / "testing"
    args = [*QUIET, "trainer.max_steps=10", "trainer.eval_every=10", "trainer.average_last=2", f"hydra.run.dir={run}"]
    log = tmp_path / "stopped.log"
    process = launch(hooked, *args, hook={"stall_test": {"marker": str(marker), "seconds": 600}}, log=log)
    deadline = time.monotonic() + 400
    while not marker.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            kill_tree(process)
            pytest.fail(f"the final test never started:\n{log.read_text()[-4000:]}")
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    status, output = finish(process, log, timeout=90)
    assert status != 0
    assert output.count("SIGTERM stopped") == 2, output[-4000:]  # both ranks
    assert "stopped the end of training" in output and "waiting for rank 0's final test" in output
    assert not (run / "results.json").exists()

    status, output = train(hooked, *args, f"trainer.resume={run / 'checkpoints' / 'last.pt'}", log=tmp_path / "end.log")
    assert status == 0, output[-4000:]
    assert "has no results.json: averaging and testing now" in output
    assert results(run)["steps"] == 10 and results(run)["test_sentences"] == 40


# ----------------------------------------------------------------------------- no silent hangs

WORKER = '''
import sys, time
from datetime import timedelta
from pathlib import Path
from seq2seq.training import distributed
from seq2seq.errors import Seq2SeqError
from seq2seq.training.lifecycle import StopSignals

mode, folder = sys.argv[1], Path(sys.argv[2])
info = distributed.init_distributed("cpu", timedelta(seconds=float(sys.argv[3])))
if info.rank == 0:
    time.sleep(300)  # never arrives
    sys.exit(0)
(folder / "rank1.pid").write_text(str(__import__("os").getpid()))
try:
    with StopSignals() as stops, stops.at_once("waiting for rank 0", folder / "last.pt"):
        distributed.barrier("rank 0's validation at step 7")
except Seq2SeqError as error:  # as seq2seq.train reports it
    print(f"error: {error}", file=sys.stderr, flush=True)
    distributed.leave(error.exit_code)
'''


def run_worker(tmp_path: Path, mode: str, timeout_seconds: float) -> subprocess.Popen:
    (tmp_path / "worker.py").write_text(WORKER)
    return subprocess.Popen(
        [*TORCHRUN[:-1], str(tmp_path / "worker.py"), mode, str(tmp_path), str(timeout_seconds)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


@pytest.mark.slow
def test_a_rank_that_never_arrives_times_out_naming_what_was_awaited(tmp_path):
    process = run_worker(tmp_path, "timeout", 3)
    try:
        output, _ = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        kill_tree(process)
        pytest.fail("the waiting rank did not give up")
    assert process.returncode != 0
    assert "rank 1 stopped waiting for rank 0's validation at step 7" in output, output[-3000:]
    assert "trainer.collective_timeout_minutes" in output


@pytest.mark.slow
def test_sigterm_ends_a_worker_stuck_waiting_for_another_rank(tmp_path):
    process = run_worker(tmp_path, "signal", 600)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "rank1.pid").exists():
            assert process.poll() is None and time.monotonic() < deadline, "rank 1 never started waiting"
            time.sleep(0.1)
        time.sleep(1)  # into the barrier
        os.kill(int((tmp_path / "rank1.pid").read_text()), signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    except (subprocess.TimeoutExpired, AssertionError):
        kill_tree(process)
        raise
    assert "SIGTERM stopped waiting for rank 0" in output, output[-3000:]


def test_a_collective_in_rank_0_only_code_fails_at_once_instead_of_hanging():
    """In one process every collective is an identity, so without this check the bug would only show as a
    hang under torchrun."""
    with distributed.main_rank_only("the final test"):
        with pytest.raises(distributed.CollectiveError, match="the final test"):
            distributed.all_gather_object(1, "every rank's random state")
    assert distributed.all_gather_object(1, "every rank's random state") == [1]


# ----------------------------------------------------------------------------- out of memory

TINY = {"name": "transformer", "d_model": 16, "num_heads": 2, "encoder_layers": 1, "decoder_layers": 1,
        "ff_dim": 32, "dropout": 0.0, "attention_dropout": 0.0, "tie_output": False}
OPTIM = {"lr": 1e-3, "betas": [0.9, 0.98], "eps": 1e-9, "weight_decay": 0.0, "schedule": "constant", "warmup_steps": 0}


def tiny_step(data_parallel: bool = False) -> Update:
    torch.manual_seed(0)
    model = build_model(model_config(TINY), 20, 20)
    optim = OptimConfig(**OPTIM)
    optimizer = build_optimizer(model, optim, fused=True)
    cpu = torch.device("cpu")
    return Update(model, wrap_model(model, cpu, data_parallel, False), optimizer,
                     build_scheduler(optimizer, optim, None), None, cpu, "fp32", 0.0, 0.0)


def test_a_batch_that_runs_out_of_memory_is_skipped_and_training_goes_on(monkeypatch):
    step = tiny_step()
    window = [collate([{"src_ids": [5, 6, 7], "tgt_ids": [8, 9]}, {"src_ids": [5], "tgt_ids": [8, 9, 10, 11]}])]
    before = {name: p.detach().clone() for name, p in step.model.named_parameters()}
    forward = Update.forward

    def out_of_memory(self, batch, normaliser):
        forward(self, batch, normaliser)[0].sum().backward()  # leave gradients behind, as a failed backward would
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(Update, "forward", out_of_memory)
    result = step(window)
    shape = f"2 sentences x {window[0].src.size(1)} source / {window[0].tgt_in.size(1)} target positions"
    assert result.out_of_memory and result.failed_batch == shape
    assert all(torch.equal(before[name], p) for name, p in step.model.named_parameters())
    assert all(p.grad is None for p in step.model.parameters()) and step.scheduler.last_epoch == 0
    monkeypatch.setattr(Update, "forward", forward)
    assert not step(window).out_of_memory and step.scheduler.last_epoch == 1


DDP_OOM_WORKER = '''
import sys
import torch
from seq2seq.data.batching import collate
from seq2seq.training import distributed
from seq2seq.training.update import Update
from test_distributed import HOOK, tiny_step

exec(HOOK.split("_HOOK = ")[0])  # _out_of_memory_inside
info = distributed.init_distributed("cpu")
step = tiny_step(data_parallel=True)
forward, calls = Update.forward, [0]

def forward_out_of_memory(self, batch, normaliser):
    calls[0] += 1
    if info.rank == 1 and calls[0] in (4, 5):  # update 2's last batch; update 3's first (under no_sync)
        return _out_of_memory_inside(self.model, forward, self, batch, normaliser)
    return forward(self, batch, normaliser)

Update.forward = forward_out_of_memory
batch = collate([{"src_ids": [5 + info.rank, 6, 7], "tgt_ids": [8, 9]}])
skipped = [step([batch, batch]).out_of_memory for _ in range(5)]
digests = distributed.all_gather_object(distributed.weights_digest(step.model), "the weight digests")
print(f"rank {info.rank} skipped {skipped} digests equal {len(set(digests)) == 1}", flush=True)
del step  # as seq2seq.train drops its trainer: the DDP model must not outlive the group into interpreter exit
distributed.cleanup()
'''


@pytest.mark.slow
def test_under_ddp_every_rank_skips_the_update_a_batch_of_one_ran_out_of_memory_in(tmp_path):
    (tmp_path / "worker.py").write_text(DDP_OOM_WORKER)
    tests_and_caller = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": tests_and_caller}  # the checkout under test
    process = subprocess.Popen([*TORCHRUN[:-1], str(tmp_path / "worker.py")], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=env)
    try:
        output, _ = process.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        kill_tree(process)
        pytest.fail("the ranks deadlocked")
    assert process.returncode == 0, output[-3000:]
    for rank in (0, 1):
        assert f"rank {rank} skipped [False, True, True, False, False] digests equal True" in output, output[-3000:]


@pytest.mark.slow
@pytest.mark.corpus
def test_one_process_skips_an_out_of_memory_batch_and_breaks_bleu_ties_by_the_validation_loss(hooked, tmp_path):
    """One run for two rules of a single process (training subprocesses are the slow part): a batch that runs
    out of memory is skipped, logged with its shape and counted; and at equal BLEU the lower loss wins best.pt,
    from the validations and from the average alike. Then too many skipped batches in a row stop a run."""
    run = tmp_path / "run"
    scores = {"valid@10": {"bleu": 0.0, "loss": 5.0}, "valid@20": {"bleu": 0.0, "loss": 4.0},
              "valid@30": {"bleu": 0.0, "loss": 4.5}, "valid_averaged@30": {"bleu": 0.0, "loss": 9.0}}
    status, output = train(
        hooked, *QUIET, "trainer.max_steps=30", "trainer.eval_every=10", "trainer.average_last=2",
        f"hydra.run.dir={run}", hook={"scores": scores, "out_of_memory": {"calls": [3]}}, launcher=None,
        log=tmp_path / "train.log",
    )
    assert status == 0, output[-4000:]
    assert re.search(r"rank 0, step 3: out of memory on a batch of \d+ sentences x \d+ source / \d+ target", output)
    finished = results(run)
    assert finished["steps"] == 30 and finished["out_of_memory_steps"] == 1
    assert load_checkpoint(run / "checkpoints" / "best.pt")["step"] == 20
    assert load_checkpoint(run / "checkpoints" / "last.pt")["train_state"]["best_loss"] == 4.0
    assert finished["best_step"] == 20 and finished["averaged"] is False

    status, output = train(
        hooked, *QUIET, "trainer.max_steps=10", "trainer.max_oom_steps=3", f"hydra.run.dir={tmp_path / 'stopped'}",
        hook={"out_of_memory": {"calls": [2, 3, 4]}}, launcher=None, log=tmp_path / "stopped.log",
    )
    assert status == 1
    assert "stopped at step 1: 3 batches in a row did not fit in memory (trainer.max_oom_steps=3)" in output
    assert "Lower trainer.max_tokens (now 1024 tokens per batch and rank" in output and "Traceback" not in output


# ----------------------------------------------------------------------------- the GPU suite, as a CPU smoke test

GPU_CHECK = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"


def gpu_check(ws: Workspace, out: Path, *options: str, timeout: float = 900) -> tuple[int, list[list[str]]]:
    result = subprocess.run(
        ["bash", str(GPU_CHECK), "--device", "cpu", "--steps", "4", "--models", "tiny_rnn tiny_transformer",
         "--out", str(out), *options, "--", *ws.overrides],
        cwd=ws.root, env={**ws.env, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=timeout,
    )
    lines = [line.split() for line in (out / "summary.txt").read_text().splitlines()]
    return result.returncode, [line for line in lines if line[0] != "note"]


@pytest.mark.slow
@pytest.mark.corpus
def test_gpu_suite_runs_on_the_cpu(ws, tmp_path):
    """scripts/gpu_check.sh --device cpu: the suite's own plumbing (train, checkpoint, translate, torchrun,
    benchmark of the real step, decoding speed) works, so on a GPU machine only the GPU can fail."""
    status, lines = gpu_check(ws, tmp_path)
    checks = [(line[1], line[0]) for line in lines if line[0] != "figure"]
    assert status == 0, lines
    assert checks == [(name, "PASS") for name in ["tiny_rnn-fp32", "tiny_transformer-fp32", "torchrun-nproc_2",
                                                  "benchmark", "speed-train", "decode-fp32-beam_1",
                                                  "decode-fp32-beam_5"]], lines
    summary = (tmp_path / "summary.txt").read_text()
    assert "replica weights identical on 2 ranks" in summary and "MFU" in summary
    figures = {line[1]: float(line[2]) for line in lines if line[0] == "figure"}
    assert figures["base_transformer.target_tokens_per_s"] > 0 and figures["decode-fp32-beam_5.sentences_per_s"] > 0
    assert figures["tiny_rnn-fp32.target_tokens_per_s"] > 0


def test_gpu_suite_skips_what_its_budget_cannot_cover(ws, tmp_path):
    status, lines = gpu_check(ws, tmp_path, "--budget-minutes", "0.2", timeout=300)
    assert status == 3 and lines and all(line[0] == "SKIP" for line in lines), lines
    assert lines[0][1] == "tiny_rnn-fp32" and "of the budget left" in " ".join(lines[0])
