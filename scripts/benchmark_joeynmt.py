"""Training speed of seq2seq against JoeyNMT 2.3 on the same model, data, batch budget and machine, in one run.

    python -m venv joey && joey/bin/pip install "torch>=2.4,<2.14" joeynmt==2.3.0 importlib_metadata \
        sentencepiece==0.2.1
    python scripts/benchmark_joeynmt.py --joeynmt-python joey/bin/python --steps 300

Positional arguments are Hydra overrides of configs/train.yaml (the Transformer by default). Both toolkits train the
same Transformer (layers, d_model, heads, feed-forward size, dropout, tied target embeddings, pre-norm), on the
training split prepared by seq2seq (the same cleaned sentences and the same SentencePiece models), with the same
token budget per batch, Adam-style optimizer, label smoothing and gradient clipping, on as many threads, one after
the other in this one process tree so that both see the same machine. Neither validates during the timed updates.

Figures are end-to-end training throughput as each toolkit reports it: target tokens (padding excluded) per second
of training. JoeyNMT logs it every `logging_freq` updates (the first window, with start-up costs, is dropped);
seq2seq writes it to results.json (validation time excluded). JoeyNMT has no bf16 path on CPUs, so seq2seq runs
twice: in fp32, which is the like-for-like comparison, and with `trainer.precision` as configured (auto: bf16
where the CPU multiplies bf16 natively).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from hydra import compose, initialize_config_dir

from seq2seq.config import RunConfig, check_config
from seq2seq.data.prepare import prepare_data
from seq2seq.paths import CONFIG_DIR
from seq2seq.runtime import device_name, resolve_device, resolve_precision

JOEY_TOKENS_PER_SEC = re.compile(r"Step:\s+(\d+),.*Tokens per Sec:\s+([\d.]+)")
JOEY_PARAMETERS = re.compile(r"Total params: (\d+)")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. trainer.max_tokens=2500")
    parser.add_argument("--joeynmt-python", required=True, type=Path, help="python of an environment with joeynmt")
    parser.add_argument("--steps", type=int, default=300, help="updates each toolkit trains")
    parser.add_argument("--log-every", type=int, default=50, help="JoeyNMT logging window (updates)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return parser.parse_args()


def write_joey_data(data, folder: Path) -> dict[str, str]:
    """Raw training and validation text, one sentence per line (JoeyNMT tokenizes with our SentencePiece models),
    and the SentencePiece models and their piece lists as JoeyNMT vocabularies."""
    paths = {}
    for split in ("train", "valid"):
        for side in ("src", "tgt"):
            lines = (text.replace("\n", " ") for text in data.splits[split][side])
            (folder / f"{split}.{side}").write_text("\n".join(lines) + "\n", encoding="utf-8")
        paths[split] = str(folder / split)
    for side, tokenizer in (("src", data.src_tokenizer), ("tgt", data.tgt_tokenizer)):
        (folder / f"{side}.model").write_bytes(tokenizer.proto)
        pieces = tokenizer.pieces(range(tokenizer.vocab_size))
        (folder / f"{side}.vocab").write_text("\n".join(p for p in pieces if not p.startswith("<")) + "\n")
    return paths


def joey_config(cfg: RunConfig, paths: dict[str, str], folder: Path, steps: int, log_every: int) -> dict:
    """A JoeyNMT 2.3 config for the Transformer and recipe in `cfg`."""
    model = cfg.model

    def side(name: str) -> dict:
        return {
            "lang": name,
            "level": "bpe",
            "tokenizer_type": "sentencepiece",
            "tokenizer_cfg": {"model_file": str(folder / f"{name}.model")},
            "voc_file": str(folder / f"{name}.vocab"),
            "max_length": 512,
        }

    def stack(layers: int) -> dict:
        return {
            "type": "transformer",
            "num_layers": layers,
            "num_heads": model.num_heads,
            "hidden_size": model.d_model,
            "ff_size": model.ff_dim,
            "dropout": model.dropout,
            "layer_norm": "pre" if model.norm_first else "post",
            "embeddings": {"embedding_dim": model.d_model, "scale": True, "dropout": model.dropout},
        }

    return {
        "name": "speed",
        "model_dir": str(folder / "model"),
        "use_cuda": False,
        "random_seed": cfg.trainer.seed,
        "data": {
            "train": paths["train"],
            "dev": paths["valid"],
            "src": side("src"),
            "trg": side("tgt"),
            "dataset_type": "plain",
        },
        "testing": {"beam_size": 1, "eval_metrics": ["bleu"]},
        "training": {
            "optimizer": "adamw",
            "adam_betas": list(cfg.optim.betas),
            "learning_rate": cfg.optim.lr,
            "learning_rate_warmup": cfg.optim.warmup_steps,
            "scheduling": "warmupinversesquareroot",
            "weight_decay": cfg.optim.weight_decay,
            "label_smoothing": cfg.trainer.label_smoothing,
            "clip_grad_norm": cfg.trainer.grad_clip,
            "normalization": "tokens",
            "loss": "crossentropy",
            "batch_size": cfg.trainer.max_tokens,
            "batch_type": "token",
            "updates": steps,
            "epochs": 1000,
            "validation_freq": 10 * steps,  # no validation inside the timed updates
            "logging_freq": min(steps, log_every),
            "keep_best_ckpts": 1,
            "overwrite": True,
            "shuffle": True,
            "print_valid_sents": [],
        },
        "model": {
            "initializer": "xavier_uniform",
            "embed_initializer": "xavier_uniform",
            "tied_embeddings": False,
            "tied_softmax": bool(model.tie_output),
            "encoder": stack(model.encoder_layers),
            "decoder": stack(model.decoder_layers),
        },
    }


def run_joey(python: Path, config: Path, threads: int, log_every: int) -> dict:
    """JoeyNMT's training command; its logged throughput windows after the first, and its parameter count."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    done = subprocess.run(
        [str(python), "-m", "joeynmt", "train", str(config), "--skip-test"], env=env, capture_output=True, text=True
    )
    log = done.stdout + done.stderr
    windows = [(int(step), float(rate)) for step, rate in JOEY_TOKENS_PER_SEC.findall(log)]
    if not windows:
        sys.exit(f"benchmark_joeynmt: JoeyNMT reported no throughput (exit {done.returncode}):\n{log[-3000:]}")
    timed = [rate for step, rate in windows if step > log_every] or [windows[-1][1]]
    parameters = JOEY_PARAMETERS.search(log)
    return {
        "target_tokens_per_s": sum(timed) / len(timed),
        "parameters": int(parameters.group(1)) if parameters else None,
        "windows": windows,
    }


def run_seq2seq(overrides: list[str], steps: int, folder: Path) -> dict:
    """`python -m seq2seq.train` for `steps` updates without validation; its results.json throughput."""
    run_dir = folder / "run"
    command = [
        sys.executable, "-m", "seq2seq.train", *overrides, f"trainer.max_steps={steps}",
        f"trainer.eval_every={10 * steps}", "trainer.time_limit_minutes=null", "trainer.test_beam_size=1",
        "trainer.average_last=0", f"hydra.run.dir={run_dir}",
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"benchmark_joeynmt: seq2seq.train failed:\n{(done.stdout + done.stderr)[-3000:]}")
    results = json.loads((run_dir / "results.json").read_text())
    return {key: results[key] for key in ("target_tokens_per_s", "parameters", "train_minutes", "steps", "precision")}


def main() -> None:
    args = parse_args()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = check_config(compose(config_name="train", overrides=args.overrides))
    if cfg.model.name != "transformer":
        sys.exit("benchmark_joeynmt: compares the Transformer (model=transformer)")
    threads = cfg.trainer.num_threads or torch.get_num_threads()
    data = prepare_data(cfg, log=lambda message: None)
    precision = resolve_precision(cfg.trainer.precision, resolve_device(cfg.trainer.device))
    with tempfile.TemporaryDirectory(prefix="joeynmt-bench-") as tmp:
        folder = Path(tmp)
        paths = write_joey_data(data, folder)
        config = folder / "joey.yaml"
        config.write_text(yaml.safe_dump(joey_config(cfg, paths, folder, args.steps, args.log_every)))
        common = [*args.overrides, f"trainer.num_threads={threads}"]
        report = {
            "cpu": device_name(torch.device("cpu")), "threads": threads, "steps": args.steps,
            "max_tokens": cfg.trainer.max_tokens,
        }
        report["joeynmt"] = run_joey(args.joeynmt_python, config, threads, args.log_every)
        report["seq2seq_fp32"] = run_seq2seq([*common, "trainer.precision=fp32"], args.steps, folder / "fp32")
        if precision != "fp32":
            report[f"seq2seq_{precision}"] = run_seq2seq(common, args.steps, folder / precision)
    joey = report["joeynmt"]["target_tokens_per_s"]
    print(f"{report['cpu']}, {threads} threads, {args.steps} updates of max {cfg.trainer.max_tokens} tokens")
    print(f"{'toolkit':<22}{'parameters':>12}{'target tokens/s':>16}{'vs JoeyNMT':>12}")
    print(f"{'JoeyNMT 2.3 (fp32)':<22}{report['joeynmt']['parameters'] or 0:>12,}{joey:>16,.0f}{1.0:>11.2f}x")
    for key in [k for k in report if k.startswith("seq2seq_")]:
        rate = report[key]["target_tokens_per_s"]
        report[key]["speedup_vs_joeynmt"] = rate / joey
        name = f"seq2seq ({report[key]['precision']})"
        print(f"{name:<22}{report[key]['parameters']:>12,}{rate:>16,.0f}{rate / joey:>11.2f}x")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
