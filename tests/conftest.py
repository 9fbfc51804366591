"""Fixtures shared by the test files."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from seq2seq.checkpoint import save_checkpoint
from seq2seq.data.batching import collate
from seq2seq.data.tokenizer import build_tokenizers
from seq2seq.config import RunConfig, model_config, saved_config
from seq2seq.models import build_model
from seq2seq.models.base import Seq2SeqModel
from seq2seq.paths import CONFIG_DIR
from seq2seq.training.update import Update

TATOEBA_RELATIVE_PATH = Path("tatoeba-cmn-eng/cmn-eng.tsv")


@pytest.fixture
def one_thread() -> Iterator[None]:
    """For tiny models: a second intra-op thread only adds contention on a shared machine (measured: 10x slower
    overfitting with 2 threads under load, no gain when idle). A test file uses it with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def corpus_path() -> Path:
    """The real Tatoeba corpus in $SEQ2SEQ_DATA_MIRROR; tests that need it are skipped (with the reason) without it."""
    mirror = os.environ.get("SEQ2SEQ_DATA_MIRROR")
    if not mirror:
        pytest.skip(f"SEQ2SEQ_DATA_MIRROR is not set; this test needs $SEQ2SEQ_DATA_MIRROR/{TATOEBA_RELATIVE_PATH}")
    path = Path(mirror) / TATOEBA_RELATIVE_PATH
    if not path.is_file():
        pytest.skip(f"Tatoeba corpus not found at {path} (SEQ2SEQ_DATA_MIRROR={mirror})")
    return path


def tatoeba_cfg(**data: object) -> RunConfig:
    """The default data + tokenizer config, with data.* overrides, as the typed config."""
    cfg = OmegaConf.create({"data": OmegaConf.load(CONFIG_DIR / "data" / "tatoeba_zh_en.yaml")})
    for key, value in data.items():
        OmegaConf.update(cfg, f"data.{key}", value, merge=False)
    return saved_config(cfg)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A fresh SEQ2SEQ_CACHE per test, so caching behaviour is observed from a clean state."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("SEQ2SEQ_CACHE", str(folder))
    return folder


TINY_MODELS = {
    "transformer": {"d_model": 32, "num_heads": 2, "encoder_layers": 1, "decoder_layers": 1, "ff_dim": 64,
                    "dropout": 0.0, "attention_dropout": 0.0, "max_positions": 64},
    "bahdanau": {"embed_dim": 24, "hidden_size": 32, "attention_dim": 32, "dropout": 0.0},
    "rnn": {"embed_dim": 24, "hidden_size": 32, "encoder_layers": 1, "decoder_layers": 1, "dropout": 0.0},
}


def corpus_pairs(path: Path, count: int = 300) -> list[tuple[str, str]]:
    """(zh, en) pairs spread over the corpus file, malformed lines skipped."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    pairs = []
    for line in lines[:: max(len(lines) // count, 1)]:
        fields = line.split("\t")
        if len(fields) >= 2 and fields[0].strip() and fields[1].strip():
            pairs.append((fields[1], fields[0]))
    return pairs[:count]


def _config(name: str) -> dict:
    """The config a training run would store (the schema's defaults and the Tatoeba preset), with a tiny model and
    vocabulary."""
    return asdict(saved_config({
        "data": OmegaConf.load(CONFIG_DIR / "data" / "tatoeba_zh_en.yaml"),
        "tokenizer": {"src_vocab_size": 1000, "tgt_vocab_size": 500, "character_coverage": 0.98},
        "model": {"name": name, **TINY_MODELS[name]},
        "trainer": {"test_beam_size": 3, "label_smoothing": 0.0},
        "optim": {"lr": 1e-2, "schedule": "constant", "warmup_steps": 0},  # fast, for a few dozen steps
    }))


def _train(model: Seq2SeqModel, config: dict, examples: list[dict], steps: int = 60) -> None:
    """A few dozen updates of the trainer's own step (`config`'s optimizer, clipping and loss) on batches of 32
    pairs: enough for outputs that look like English, not like random ids."""
    torch.manual_seed(0)
    rng = random.Random(0)
    update = Update.from_config(model, saved_config(config), torch.device("cpu"), "fp32", data_parallel=False,
                                total_steps=steps)
    model.train()
    for _ in range(steps):
        update([collate(rng.sample(examples, 32))])
    model.eval()


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, corpus_path) -> dict[str, Path]:
    """Tiny rnn, bahdanau and transformer checkpoints from ~300 Tatoeba pairs, built once per session: tiny
    SentencePiece vocabularies, a few dozen training steps, saved with the configs training would write."""
    pairs = corpus_pairs(corpus_path)
    folder = tmp_path_factory.mktemp("checkpoints")
    tok_cfg = saved_config(_config("transformer")).tokenizer
    src_tok, tgt_tok = build_tokenizers(  # NFKC on both sides and not recorded: as older checkpoints
        [zh for zh, _ in pairs], [en for _, en in pairs], tok_cfg, folder / "cache", ("NFKC", "NFKC")
    )
    examples = [
        {"src_ids": src_tok.encode(zh), "tgt_ids": tgt_tok.encode(en), "index": i} for i, (zh, en) in enumerate(pairs)
    ]
    paths = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared CPU: more threads only contend
    try:
        for name in TINY_MODELS:
            config = _config(name)
            torch.manual_seed(0)
            model = build_model(model_config(config["model"]), src_tok.vocab_size, tgt_tok.vocab_size)
            _train(model, config, examples)
            paths[name] = folder / f"{name}.pt"
            save_checkpoint(paths[name], {
                "config": config, "model": model.state_dict(), "src_tokenizer": src_tok.proto,
                "tgt_tokenizer": tgt_tok.proto, "step": 60, "epoch": 0, "best_valid_bleu": None, "metrics": {},
            })
    finally:
        torch.set_num_threads(threads)
    return paths


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Tests marked `cuda` (the GPU suite, `pytest -m cuda`) are skipped where torch sees no GPU."""
    if item.get_closest_marker("cuda") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False)")


# ----------------------------------------------------------------------------- processes

# The README's data-parallel command (section "Several GPUs and nodes"), with two processes.
TORCHRUN = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node=2", "-m"]


def descendants(pid: int) -> list[int]:
    """Every process `pid` started, children first (torchrun starts its workers in sessions of their own)."""
    children = []
    for tasks in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):  # the process may be gone already
            children += [int(child) for child in tasks.read_text().split()]
    return [found for child in children for found in (child, *descendants(child))]


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL a launcher and every process it started, then reap it."""
    for pid in [process.pid, *descendants(process.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait()


# ----------------------------------------------------------------------------- training workspaces

SLICE_LINES = 3000

# Model files for training subprocesses (Workspace). The Chinese side of 3000 pairs has ~1000 characters at
# coverage 0.98, plus 260 byte/special pieces.
TINY_MODEL_FILES = {
    "tiny_rnn": "name: rnn\ncell: gru\nembed_dim: 32\nhidden_size: 32\nencoder_layers: 1\ndecoder_layers: 1\n"
    "bidirectional: true\ndropout: 0.1\ntie_output: false\n",
    "tiny_bahdanau": "name: bahdanau\ncell: gru\nembed_dim: 32\nhidden_size: 32\nencoder_layers: 1\ndecoder_layers: 1\n"
    "attention_dim: 32\ndropout: 0.1\ntie_output: false\n",
    "tiny_transformer": "name: transformer\nd_model: 32\nnum_heads: 2\nencoder_layers: 2\ndecoder_layers: 2\n"
    "ff_dim: 64\ndropout: 0.1\nattention_dropout: 0.1\nnorm_first: true\npositional: sinusoidal\n"
    "max_positions: 256\ntie_output: true\nshare_embeddings: false\n",
}


@dataclass
class Workspace:
    """A folder with a slice of the corpus and tiny model configs, where `seq2seq.train` runs as a subprocess."""

    root: Path
    env: dict[str, str]
    overrides: list[str]

    def train(
        self, *args: str, launcher: list[str] | None = None, multirun: bool = False, timeout: float = 600
    ) -> subprocess.CompletedProcess:
        flags = ["--multirun"] if multirun else []
        command = (launcher or [sys.executable, "-m"]) + ["seq2seq.train", *flags, *self.overrides, *args]
        return subprocess.run(command, cwd=self.root, env=self.env, capture_output=True, text=True, timeout=timeout)

    def popen(self, *args: str, launcher: list[str] | None = None) -> subprocess.Popen:
        command = (launcher or [sys.executable, "-m"]) + ["seq2seq.train", *self.overrides, *args]
        return subprocess.Popen(command, cwd=self.root, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def ws(tmp_path_factory, corpus_path) -> Workspace:
    root = tmp_path_factory.mktemp("train")
    with open(corpus_path, encoding="utf-8", errors="replace") as source, open(root / "slice.tsv", "w", encoding="utf-8") as out:
        for _, line in zip(range(SLICE_LINES), source):
            out.write(line)
    model_dir = root / "configs" / "model"
    model_dir.mkdir(parents=True)
    for name, text in TINY_MODEL_FILES.items():
        (model_dir / f"{name}.yaml").write_text(text)
    env = {**os.environ, "SEQ2SEQ_CACHE": str(root / "cache"), "HYDRA_FULL_ERROR": "0", "PYTHONUNBUFFERED": "1"}
    overrides = [
        f"hydra.searchpath=[file://{root / 'configs'}]",
        f"data.path={root / 'slice.tsv'}",
        "data.split.valid_size=40",
        "data.split.test_size=40",
        "tokenizer.src_vocab_size=1500",
        "tokenizer.tgt_vocab_size=400",
        "tokenizer.character_coverage=0.98",
        "trainer.max_tokens=1024",
        "trainer.log_every=5",
        "trainer.num_threads=1",
        "trainer.valid_max_sentences=20",
        "trainer.test_beam_size=2",
        "trainer.num_attention_samples=1",
        "attention_examples=['我是一个学生。']",
    ]
    return Workspace(root, env, overrides)
