"""Training end to end on a slice of the real Tatoeba corpus: curves, attention maps, checkpoints that translate,
exact resume after a kill, identical DDP replicas, divergence handling; plus the optimizer pieces in isolation.

The subprocess runs use tiny models (a few dozen steps, one CPU thread) so the whole file takes a few minutes.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from seq2seq.checkpoint import load_checkpoint, load_model
from seq2seq.config import OptimConfig
from seq2seq.training.optim import build_optimizer, lr_multiplier, parameter_groups
from seq2seq.inference.predict import translate_sentences
from seq2seq.training.distributed import weights_digest
from seq2seq.training.update import token_loss
from seq2seq.training.state import average_state_dicts

from conftest import TORCHRUN, Workspace, kill_tree
from test_board import chart_tags, comparison_layout

def kill_after_first_checkpoint(process: subprocess.Popen, runs: Path) -> Path:
    """SIGKILL the run (a launcher and all its workers) as soon as it has written checkpoints/last.pt;
    -> its run folder."""
    deadline = time.monotonic() + 300
    try:
        while not list(runs.glob("*/checkpoints/last.pt")):
            assert process.poll() is None, "the run ended before writing checkpoints/last.pt"
            assert time.monotonic() < deadline, "no checkpoint within 5 minutes"
            time.sleep(0.05)
    finally:
        kill_tree(process)
    (interrupted,) = [path.parent.parent for path in runs.glob("*/checkpoints/last.pt")]
    return interrupted


def events(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def scalars(accumulator, tag: str) -> list[tuple[int, float]]:
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


def text(accumulator, tag: str) -> str:
    return "\n".join(event.tensor_proto.string_val[0].decode() for event in accumulator.Tensors(tag))


# ----------------------------------------------------------------------------- the three families, one multirun


@pytest.fixture(scope="module")
def sweep(ws) -> dict[str, Path]:
    result = ws.train(
        "model=tiny_rnn,tiny_bahdanau,tiny_transformer", "trainer.max_steps=30", "trainer.eval_every=15",
        "trainer.average_last=2", f"hydra.sweep.dir={ws.root / 'sweep'}", multirun=True,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    runs = {}
    for family in ("rnn", "bahdanau", "transformer"):
        found = list((ws.root / "sweep" / "tatoeba_zh_en" / family).glob("*/results.json"))
        assert len(found) == 1, f"expected one {family} run folder, found {found}"
        runs[family] = found[0].parent
    assert "run folder:" in result.stdout + result.stderr
    return runs


@pytest.mark.slow
@pytest.mark.corpus
@pytest.mark.parametrize("family", ["rnn", "bahdanau", "transformer"])
def test_run_logs_curves_metrics_and_attention(sweep, family):
    run = sweep[family]
    assert (run / ".hydra" / "config.yaml").is_file()
    acc = events(run)
    tags = acc.Tags()
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/nonfinite_steps",
                "valid/loss", "valid/ppl", "valid/bleu", "valid/chrf",
                "hparam/valid_bleu", "hparam/test_bleu", "hparam/test_chrf", "hparam/params"):
        assert tag in tags["scalars"], f"{tag} missing from {family}'s events"
    assert [step for step, _ in scalars(acc, "valid/bleu")] == [15, 30]
    assert [step for step, _ in scalars(acc, "train/loss")] == [5, 10, 15, 20, 25, 30]
    lrs = [value for _, value in scalars(acc, "train/lr")]
    assert lrs == sorted(lrs) and lrs[0] > 0  # still warming up
    assert all(math.isfinite(value) for _, value in scalars(acc, "train/loss"))
    # The test's one-point figures are a text summary (and the HPARAMS row), not scalar charts.
    assert not any(tag.startswith("test/") for tag in tags["scalars"])
    assert "| source tokens | sentences | BLEU |" in text(acc, "test/scores/text_summary")
    # TensorBoard's comparison layout draws curves this run writes in each of its charts.
    assert all(drawn for drawn in chart_tags(comparison_layout(acc), tags["scalars"]).values())
    assert "| source | reference | hypothesis |" in text(acc, "valid/samples/text_summary")

    images = tags["images"]
    if family == "rnn":
        assert images == []
        assert "has no attention" in text(acc, "attention/text_summary")
    elif family == "bahdanau":
        assert sorted(images) == ["attention/00", "attention/01"]  # one validation sentence + 我是一个学生。
        assert len(acc.Images("attention/01")) == 2  # one per validation
    else:
        expected = {f"attention/{i:02d}/{name}" for i in (0, 1) for name in ("layer_1", "layer_2", "heads_layer_2")}
        assert set(images) == expected
        image = acc.Images("attention/01/heads_layer_2")[-1]
        assert image.encoded_image_string.startswith(b"\x89PNG") and image.width > 100

    # average_last=2: the weights of both validations were kept and their average was evaluated
    assert sorted(p.name for p in (run / "checkpoints" / "average").iterdir()) == ["step_000000015.pt", "step_000000030.pt"]
    assert [step for step, _ in scalars(acc, "valid_averaged/bleu")] == [30]

    results = json.loads((run / "results.json").read_text())
    assert results["model"] == family and results["steps"] == 30 and results["parameters"] > 0
    assert results["stopped_by"] == "max_steps" and isinstance(results["averaged"], bool)
    assert results["test_sentences"] == 40 and results["test_bleu_by_length"]
    assert results["target_tokens_per_s"] > 0 and results["valid_bleu"] is not None
    assert results["test_bleu"] == pytest.approx(scalars(acc, "hparam/test_bleu")[-1][1], abs=1e-4)
    # resident memory: at each validation on TensorBoard, the peaks in results.json (the end's at least training's)
    peaks = [value for _, value in scalars(acc, "system/peak_resident_gib")]
    assert len(peaks) == 2 and peaks == sorted(peaks) and 0.05 < peaks[0] < 8
    assert all(0.05 < value <= peak + 1e-6 for (_, value), peak in zip(scalars(acc, "system/resident_gib"), peaks))
    assert peaks[-1] <= results["peak_rss_gib_training"] + 1e-3 <= results["peak_rss_gib"] + 2e-3


@pytest.mark.slow
@pytest.mark.corpus
@pytest.mark.parametrize("family", ["rnn", "bahdanau", "transformer"])
def test_checkpoint_holds_everything_and_translates(sweep, family):
    run = sweep[family]
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert last["step"] == 30
    for key in ("optimizer", "scheduler", "rng", "sampler", "train_state", "src_tokenizer", "tgt_tokenizer"):
        assert last[key] is not None, key
    assert last["config"]["model"]["name"] == family and last["config"]["data"]["split"]["valid_size"] == 40

    loaded = load_model(run / "checkpoints" / "best.pt")
    assert loaded.config.model.name == family
    (translation,) = translate_sentences(
        loaded.model, loaded.src_tokenizer, loaded.tgt_tokenizer, ["我是一个学生。"], beam_size=2
    )
    assert translation.src_pieces[-1] == "</s>" and len(translation.src_pieces) > 1
    best = translation.best  # hypotheses always hold one entry, even for an empty input: check what it holds
    assert best.pieces and translation.text.strip() and math.isfinite(best.score) and best.score < 0


@pytest.mark.slow
@pytest.mark.corpus
def test_compare_script_reads_the_three_results(sweep, ws, tmp_path):
    result = subprocess.run(
        [sys.executable, str(Path(__file__).resolve().parents[1] / "scripts" / "compare.py"), str(ws.root / "sweep"),
         "--out", str(tmp_path)], env=ws.env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = (tmp_path / "comparison.md").read_text()
    assert all(f"| {family} |" in table for family in ("rnn", "bahdanau", "transformer"))


# ----------------------------------------------------------------------------- exact resume after a kill


RESUME_ARGS = ["model=tiny_transformer", "trainer.eval_every=15", "trainer.num_attention_samples=0",
               "attention_examples=[]", "trainer.test_beam_size=1"]


@pytest.mark.slow
@pytest.mark.corpus
def test_resume_after_kill_matches_an_uninterrupted_run(ws):
    straight = ws.root / "straight"
    result = ws.train(*RESUME_ARGS, "trainer.max_steps=45", f"hydra.run.dir={straight}")
    assert result.returncode == 0, result.stderr[-3000:]

    # Same config and seed, default run folder (runs/<data>/<model>/<timestamp>), killed after its first save.
    runs = ws.root / "runs" / "tatoeba_zh_en" / "transformer"
    interrupted = kill_after_first_checkpoint(ws.popen(*RESUME_ARGS, "trainer.max_steps=1000"), runs)
    saved_step = load_checkpoint(interrupted / "checkpoints" / "last.pt")["step"]
    assert saved_step in (15, 30)

    result = ws.train(*RESUME_ARGS, "trainer.max_steps=45", "trainer.resume=auto")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout + result.stderr
    assert [p.parent.parent for p in runs.glob("*/checkpoints/last.pt")] == [interrupted]  # same folder

    expected = load_checkpoint(straight / "checkpoints" / "last.pt")
    resumed = load_checkpoint(interrupted / "checkpoints" / "last.pt")
    assert resumed["step"] == expected["step"] == 45
    for name, tensor in expected["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), f"{name} differs after resume"
    assert resumed["scheduler"]["last_epoch"] == expected["scheduler"]["last_epoch"]
    # Same logged losses and learning rates at every step (events after the saved step were purged).
    for tag in ("train/loss", "train/lr", "valid/loss"):
        assert scalars(events(interrupted), tag) == scalars(events(straight), tag), tag

    # A truncated checkpoint is refused with a message that names it.
    broken = ws.root / "broken.pt"
    data = (straight / "checkpoints" / "last.pt").read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    result = ws.train(*RESUME_ARGS, "trainer.max_steps=50", f"trainer.resume={broken}",
                      f"hydra.run.dir={ws.root / 'broken_run'}")
    assert result.returncode == 2
    assert str(broken) in result.stderr and "Traceback" not in result.stderr


# ----------------------------------------------------------------------------- data parallel


@pytest.mark.slow
@pytest.mark.corpus
def test_torchrun_gloo_keeps_replicas_identical(ws):
    run = ws.root / "ddp"
    result = ws.train(
        "model=tiny_transformer", "trainer.max_steps=20", "trainer.eval_every=10", "trainer.accumulate=2",
        "trainer.num_attention_samples=0", "attention_examples=[]", "trainer.test_beam_size=1",
        f"hydra.run.dir={run}", launcher=TORCHRUN,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    match = re.search(r"replica weights identical on 2 ranks at step 20 \(sha1: rank0=(\w+), rank1=(\w+)\)", output)
    assert match, output[-3000:]
    assert match.group(1) == match.group(2)
    assert weights_digest(load_model(run / "checkpoints" / "last.pt").model) == match.group(1)
    results = json.loads((run / "results.json").read_text())
    assert results["world_size"] == 2 and results["steps"] == 20
    assert output.count("test (best.pt") == 1  # only rank 0 validates, tests and logs


DDP_RESUME_ARGS = [*RESUME_ARGS, "trainer.max_steps=30"]
REPLICAS = re.compile(r"replica weights identical on 2 ranks at step 30 \(sha1: rank0=(\w+), rank1=(\w+)\)")


@pytest.mark.slow
@pytest.mark.corpus
def test_torchrun_gloo_killed_and_resumed_matches_an_uninterrupted_run(ws):
    """Both ranks' dropout masks and batches must replay after a resume: with a per-rank RNG or loader state
    lost, rank 1's gradients (and so the shared weights) would differ from the uninterrupted run's."""
    straight = ws.train(*DDP_RESUME_ARGS, f"hydra.run.dir={ws.root / 'ddp_straight'}", launcher=TORCHRUN)
    assert straight.returncode == 0, (straight.stdout + straight.stderr)[-4000:]
    expected = REPLICAS.search(straight.stdout + straight.stderr)
    assert expected, (straight.stdout + straight.stderr)[-3000:]

    runs = ws.root / "ddp_runs"
    killed = ws.popen(*DDP_RESUME_ARGS, f"hydra.run.dir={runs / 'killed'}", launcher=TORCHRUN)
    interrupted = kill_after_first_checkpoint(killed, runs)
    assert load_checkpoint(interrupted / "checkpoints" / "last.pt")["step"] == 15
    resumed = ws.train(*DDP_RESUME_ARGS, f"hydra.run.dir={interrupted}",
                       f"trainer.resume={interrupted / 'checkpoints' / 'last.pt'}", launcher=TORCHRUN)
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0 and "resumed from" in output, output[-4000:]
    digests = REPLICAS.search(output)
    assert digests, output[-3000:]
    assert digests.groups() == expected.groups()  # rank 0 and rank 1 alike


DDP_WORKER = """
import sys
import torch
from seq2seq.training import distributed
from seq2seq.data.batching import collate
from seq2seq.config import OptimConfig, model_config
from seq2seq.models import build_model
from seq2seq.training.optim import build_optimizer, build_scheduler
from seq2seq.training.update import Update, token_loss, wrap_model

MODEL = {"name": "transformer", "d_model": 16, "num_heads": 2, "encoder_layers": 1, "decoder_layers": 1,
         "ff_dim": 32, "dropout": 0.0, "attention_dropout": 0.0, "tie_output": False}
OPTIM = OptimConfig(lr=1e-3, betas=[0.9, 0.98], eps=1e-9, weight_decay=0.0, schedule="constant", warmup_steps=0)
CPU = torch.device("cpu")
# Rank 0 gets 2 target tokens, rank 1 gets 27: a mean of per-rank means weighs rank 0's tokens 13 times more.
BATCHES = [collate([{"src_ids": [5, 6], "tgt_ids": [7]}]),
           collate([{"src_ids": [8, 9, 10], "tgt_ids": [11] * 8}, {"src_ids": [12], "tgt_ids": [13] * 17}])]


def gradients(data_parallel, window):
    torch.manual_seed(0)
    model = build_model(model_config(MODEL), 20, 20)
    optimizer = build_optimizer(model, OPTIM, fused=True)
    step = Update(model, wrap_model(model, CPU, data_parallel, False), optimizer,
                     build_scheduler(optimizer, OPTIM, None), None, CPU, "fp32", 0.0, 0.0)
    step(window)
    return model, {name: p.grad.clone() for name, p in model.named_parameters()}


info = distributed.init_distributed("cpu")
_, ddp = gradients(True, [BATCHES[info.rank]])
distributed.cleanup()
if info.rank == 0:
    model, reference = gradients(False, BATCHES)  # one process, both batches: the global per-token mean
    model.zero_grad()
    for batch in BATCHES:  # the former normalisation: each rank's own mean, averaged by DDP
        (token_loss(model(batch.src, batch.src_mask, batch.tgt_in).logits, batch.tgt_out)
         / batch.num_tgt_tokens / 2).backward()
    torch.save({"ddp": ddp, "reference": reference,
                "mean_of_means": {n: p.grad.clone() for n, p in model.named_parameters()}}, sys.argv[1])
"""


@pytest.mark.slow
def test_ddp_gradients_are_the_global_per_token_mean(tmp_path):
    """Two Gloo ranks with very different token counts update as one process that saw both batches would."""
    worker = tmp_path / "worker.py"
    worker.write_text(DDP_WORKER)
    result = subprocess.run(
        [*TORCHRUN[:-1], str(worker), str(tmp_path / "grads.pt")], capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    grads = torch.load(tmp_path / "grads.pt")
    for name, reference in grads["reference"].items():
        torch.testing.assert_close(grads["ddp"][name], reference, rtol=1e-5, atol=1e-7, msg=name)
    assert not all(torch.allclose(grads["mean_of_means"][n], r, rtol=1e-3) for n, r in grads["reference"].items())


# ----------------------------------------------------------------------------- divergence


@pytest.mark.slow
@pytest.mark.corpus
def test_non_finite_steps_are_skipped_counted_and_stop_the_run(ws):
    run = ws.root / "diverged"
    result = ws.train(
        "model=tiny_transformer", "trainer.max_steps=40", "trainer.eval_every=20", "trainer.log_every=1",
        "optim.lr=1e30", "optim.warmup_steps=0", "trainer.max_nonfinite_steps=3", f"hydra.run.dir={run}",
    )
    assert result.returncode == 1
    assert "3 consecutive steps had a non-finite loss or gradient" in result.stderr
    assert "Traceback" not in result.stderr
    counts = [value for _, value in scalars(events(run), "train/nonfinite_steps")]
    assert counts[-1] == 3 and counts[0] == 0  # the first update is finite, the next three are skipped
    assert not (run / "results.json").exists()


@pytest.mark.slow
@pytest.mark.corpus
def test_time_limit_stops_training_but_still_validates_and_tests(ws):
    run = ws.root / "timed"
    result = ws.train(
        "model=tiny_rnn", "trainer.max_steps=100000", "trainer.time_limit_minutes=0.0001", "trainer.eval_every=1000",
        "trainer.num_attention_samples=0", "attention_examples=[]", f"hydra.run.dir={run}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((run / "results.json").read_text())
    assert results["stopped_by"] == "time_limit_minutes" and results["steps"] < 1000
    assert results["test_sentences"] == 40 and (run / "checkpoints" / "best.pt").is_file()


@pytest.mark.slow
@pytest.mark.corpus
def test_a_cosine_bounded_by_time_alone_reaches_its_floor_as_time_runs_out(ws):
    """No step budget, a 15-second limit: the schedule's end is re-estimated from the pace every log interval, so
    the last update runs near min_lr_ratio, not at the peak a step-less cosine would keep."""
    run = ws.root / "cosine_in_time"
    result = ws.train(
        "model=tiny_transformer", "trainer.max_steps=null", "trainer.time_limit_minutes=0.25", "trainer.log_every=5",
        "trainer.eval_every=100000", "optim.schedule=cosine", "optim.warmup_steps=4", "optim.min_lr_ratio=0.05",
        "trainer.num_attention_samples=0", "attention_examples=[]", "trainer.test_beam_size=1", f"hydra.run.dir={run}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    payload = load_checkpoint(run / "checkpoints" / "last.pt")
    steps, planned = payload["step"], payload["train_state"]["planned_steps"]
    assert steps > 40 and planned is not None and abs(planned - steps) <= 0.15 * steps
    peak = payload["config"]["optim"]["lr"]
    assert payload["optimizer"]["param_groups"][0]["lr"] < 0.2 * peak


# ----------------------------------------------------------------------------- optimizer pieces


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.norm = nn.LayerNorm(4)
        self.proj = nn.Linear(4, 10)
        self.proj.weight = self.embed.weight  # tied like a transformer's output layer
        self.hidden = nn.Linear(4, 4)


def test_weight_decay_only_on_weight_matrices():
    model = _Toy()
    decay, no_decay = parameter_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [id(p) for p in decay["params"]] == [id(model.hidden.weight)]
    expected = {id(model.embed.weight), id(model.norm.weight), id(model.norm.bias), id(model.proj.bias), id(model.hidden.bias)}
    assert {id(p) for p in no_decay["params"]} == expected


def test_schedules():
    inverse_sqrt = lr_multiplier("inverse_sqrt", warmup_steps=100)
    assert inverse_sqrt(0) == pytest.approx(0.01) and inverse_sqrt(99) == pytest.approx(1.0)
    assert inverse_sqrt(399) == pytest.approx(0.5)  # sqrt(100 / 400)
    cosine = lr_multiplier("cosine", warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert cosine(9) == pytest.approx(1.0) and cosine(59) == pytest.approx(0.55) and cosine(109) == pytest.approx(0.1)
    constant = lr_multiplier("constant", warmup_steps=4)
    assert [constant(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="unknown learning-rate schedule"):
        lr_multiplier("linear", 10)


def test_found_inf_skips_the_fused_update():
    """The trainer skips non-finite steps through AdamW's found_inf without a host sync; check it really skips."""
    model = nn.Linear(3, 2)
    optimizer = build_optimizer(model, OptimConfig(lr=0.1, betas=[0.9, 0.98], eps=1e-9, weight_decay=0.1), fused=True)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.found_inf = torch.tensor(0.0)
    optimizer.step()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    state = {k: v.clone() for k, v in optimizer.state[model.weight].items()}
    for p in model.parameters():
        p.grad.fill_(float("nan"))
    optimizer.found_inf = torch.tensor(1.0)
    optimizer.step()
    assert all(torch.equal(before[name], p) for name, p in model.named_parameters())
    assert all(torch.equal(state[k], v) for k, v in optimizer.state[model.weight].items())


def test_token_loss_ignores_padding_and_sums():
    logits = torch.randn(2, 3, 5)
    target = torch.tensor([[1, 2, 0], [4, 0, 0]])
    expected = sum(-torch.log_softmax(logits[b, t], -1)[target[b, t]] for b, t in [(0, 0), (0, 1), (1, 0)])
    assert token_loss(logits, target).item() == pytest.approx(expected.item(), rel=1e-5)


def test_average_state_dicts():
    states = [{"w": torch.tensor([1.0, 3.0]), "n": torch.tensor(1)}, {"w": torch.tensor([3.0, 5.0]), "n": torch.tensor(2)}]
    averaged = average_state_dicts(states)
    assert torch.equal(averaged["w"], torch.tensor([2.0, 4.0])) and averaged["n"].item() == 2
