"""Training and decoding speed of one model configuration, with model FLOPs utilisation.

    python scripts/benchmark.py model=transformer --device cpu --precision bf16
    python scripts/benchmark.py model=transformer model.d_model=512 model.num_heads=8 \
        model.encoder_layers=6 model.decoder_layers=6 model.ff_dim=2048 --device cuda --synthetic

Positional arguments are Hydra overrides of configs/train.yaml, so the benchmark measures exactly what
`python -m seq2seq.train` with the same overrides would train. Prints a table and writes JSON (--json).

What is measured, on real length-bucketed batches of the training split (or synthetic ones of Tatoeba-like lengths):
  - throughput: target tokens/s, source+target tokens/s, sentences/s (padding excluded);
  - time per step split into data (batch to device), forward, backward and optimizer, each synchronised;
  - peak memory: resident set size on the CPU, max allocated on CUDA;
  - model FLOPs per target token, counted by torch's FlopCounterMode on real steps (matrix products only), and
    MFU = achieved model FLOP/s / the matrix-multiply peak measured here on the same device and dtype;
  - decoding speed with a trained checkpoint (--checkpoint) on test sentences: greedy and beam 5, sentences/s and
    target tokens/s (an untrained model emits arbitrary lengths, so decoding is only timed with a checkpoint).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from torch.utils.flop_counter import FlopCounterMode

from seq2seq.checkpoint import load_model
from seq2seq.data.prepare import prepare_data
from seq2seq.data.batching import Batch, TokenBatchSampler, collate
from seq2seq.data.tokenizer import PAD_ID
from seq2seq.models import build_model
from seq2seq.models.base import count_parameters
from seq2seq.paths import CONFIG_DIR
from seq2seq.predict import translate_sentences

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=bahdanau trainer.max_tokens=4096")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--steps", type=int, default=30, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (allocator, oneDNN kernels)")
    parser.add_argument("--synthetic", action="store_true", help="random tokens with Tatoeba-like lengths")
    parser.add_argument("--checkpoint", type=Path, default=None, help="trained checkpoint whose decoding to time")
    parser.add_argument("--decode-sentences", type=int, default=1500, help="test sentences to decode")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return parser.parse_args()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int = 2048, repeats: int = 20) -> float:
    """Best FLOP/s of a square matrix product at this device and dtype: the denominator of MFU."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def real_batches(cfg, splits, max_tokens: int, count: int) -> list[Batch]:
    """Length-bucketed training batches exactly as the trainer's sampler cuts them."""
    train = splits["train"]
    sampler = TokenBatchSampler(
        [len(ids) for ids in train["src_ids"]], [len(ids) for ids in train["tgt_ids"]],
        max_tokens=max_tokens, shuffle=True, seed=cfg.trainer.seed,
    )
    batches = []
    for indices in sampler:
        batches.append(collate([train[int(i)] for i in indices]))
        if len(batches) == count:
            break
    return batches


def synthetic_batches(max_tokens: int, count: int, src_vocab: int, tgt_vocab: int, seed: int) -> list[Batch]:
    """Batches of random ids whose lengths follow Tatoeba's (median ~10 target pieces, up to ~40)."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        length = int(torch.randint(6, 40, (1,), generator=generator))
        size = max(1, max_tokens // (length + 1))
        examples = [
            {
                "src_ids": torch.randint(4, src_vocab, (length,), generator=generator).tolist(),
                "tgt_ids": torch.randint(4, tgt_vocab, (length,), generator=generator).tolist(),
                "index": i,
            }
            for i in range(size)
        ]
        batches.append(collate(examples))
    return batches


def loss_of(model, batch: Batch, label_smoothing: float) -> torch.Tensor:
    logits = model(batch.src, batch.src_mask, batch.tgt_in).logits
    loss = F.cross_entropy(
        logits.float().flatten(0, 1), batch.tgt_out.flatten(), ignore_index=PAD_ID,
        label_smoothing=label_smoothing, reduction="sum",
    )
    return loss / batch.num_tgt_tokens


def count_flops(model, batch: Batch, autocast, label_smoothing: float) -> int:
    """Forward + backward FLOPs of one step (matrix products, attention included), counted by torch itself."""
    counter = FlopCounterMode(display=False)
    with counter, autocast():
        loss = loss_of(model, batch, label_smoothing)
    with counter:
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def benchmark_training(model, batches, device, autocast, label_smoothing, warmup) -> dict:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    phases = {"data": [], "forward": [], "backward": [], "optimizer": []}
    tgt_tokens = src_tokens = sentences = 0
    model.train()
    for step, cpu_batch in enumerate(batches):
        timed = step >= warmup
        synchronize(device)
        t0 = time.perf_counter()
        batch = cpu_batch.to(device)
        synchronize(device)
        t1 = time.perf_counter()
        with autocast():
            loss = loss_of(model, batch, label_smoothing)
        synchronize(device)
        t2 = time.perf_counter()
        loss.backward()
        synchronize(device)
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        t4 = time.perf_counter()
        if timed:
            for name, seconds in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                phases[name].append(seconds)
            tgt_tokens += int(batch.num_tgt_tokens)
            src_tokens += int(batch.num_src_tokens)
            sentences += batch.size
    total = sum(sum(times) for times in phases.values())
    return {
        "steps": len(phases["data"]),
        "seconds": total,
        "target_tokens_per_s": tgt_tokens / total,
        "tokens_per_s": (src_tokens + tgt_tokens) / total,
        "sentences_per_s": sentences / total,
        "target_tokens_per_step": tgt_tokens / len(phases["data"]),
        "ms_per_step": {name: 1000 * statistics.mean(times) for name, times in phases.items()},
    }


def benchmark_decoding(model, src_tok, tgt_tok, sentences, device, precision, beam_size) -> dict:
    model.eval()
    start = time.perf_counter()
    outputs = list(
        translate_sentences(
            model, src_tok, tgt_tok, sentences, beam_size=beam_size, device=device, precision=precision
        )
    )
    seconds = time.perf_counter() - start
    tokens = sum(len(t.hypotheses[0].pieces) for t in outputs)
    return {"beam_size": beam_size, "sentences_per_s": len(outputs) / seconds, "target_tokens_per_s": tokens / seconds}


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmark: --device cuda asked for, but torch sees no GPU")
    dtype = DTYPES[args.precision]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=args.overrides)
    torch.manual_seed(cfg.trainer.seed)

    count = args.warmup + args.steps
    if args.synthetic:
        src_vocab, tgt_vocab = cfg.tokenizer.src_vocab_size, cfg.tokenizer.tgt_vocab_size
        batches = synthetic_batches(cfg.trainer.max_tokens, count, src_vocab, tgt_vocab, cfg.trainer.seed)
        data = None
    else:
        data = prepare_data(cfg)
        src_vocab, tgt_vocab = data.src_tokenizer.vocab_size, data.tgt_tokenizer.vocab_size
        batches = real_batches(cfg, data.splits, cfg.trainer.max_tokens, count)

    model = build_model(cfg.model, src_vocab, tgt_vocab).to(device)
    step_model = torch.compile(model) if args.compile else model

    def autocast():
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    label_smoothing = cfg.trainer.label_smoothing
    flops_per_step = count_flops(model, batches[0].to(device), autocast, label_smoothing)
    flops_per_tgt_token = flops_per_step / int(batches[0].num_tgt_tokens)
    training = benchmark_training(step_model, batches, device, autocast, label_smoothing, args.warmup)
    peak = matmul_peak(device, dtype)
    achieved = flops_per_tgt_token * training["target_tokens_per_s"]

    decoding = []
    if args.checkpoint is not None:
        if data is None:
            sys.exit("benchmark: --checkpoint decodes real test sentences; drop --synthetic")
        trained = load_model(args.checkpoint, device)
        sentences = list(data.splits["test"]["src"])[: args.decode_sentences]
        for beam in (1, 5):
            decoding.append(
                benchmark_decoding(trained.model, trained.src_tokenizer, trained.tgt_tokenizer, sentences, device,
                                   args.precision, beam)
            )

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    report = {
        "device": device_name,
        "precision": args.precision,
        "model": cfg.model.name,
        "overrides": args.overrides,
        "parameters": count_parameters(model),
        "max_tokens": cfg.trainer.max_tokens,
        "data": "synthetic" if args.synthetic else cfg.data.name,
        "training": training,
        "model_flops_per_target_token": flops_per_tgt_token,
        "achieved_model_tflops": achieved / 1e12,
        "matmul_peak_tflops": peak / 1e12,
        "mfu": achieved / peak,
        "peak_memory_mib": peak_memory_mib(device),
        "decoding": decoding,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}", file=sys.stderr)


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "cpu"


def print_table(report: dict) -> None:
    training = report["training"]
    phases = training["ms_per_step"]
    rows = [
        ("device", f"{report['device']} ({report['threads']} threads), {report['precision']}"),
        ("model", f"{report['model']}, {report['parameters'] / 1e6:.2f} M parameters"),
        ("batches", f"{report['data']}, max_tokens {report['max_tokens']}, "
                    f"{training['target_tokens_per_step']:.0f} real target tokens/step"),
        ("target tokens/s", f"{training['target_tokens_per_s']:,.0f}"),
        ("src+tgt tokens/s", f"{training['tokens_per_s']:,.0f}"),
        ("sentences/s", f"{training['sentences_per_s']:,.1f}"),
        ("ms/step", " ".join(f"{name} {ms:.1f}" for name, ms in phases.items())),
        ("peak memory", f"{report['peak_memory_mib']:,.0f} MiB"),
        ("model FLOPs/target token", f"{report['model_flops_per_target_token'] / 1e6:.1f} M"),
        ("achieved", f"{report['achieved_model_tflops']:.3f} TFLOP/s"),
        ("matmul peak (measured)", f"{report['matmul_peak_tflops']:.3f} TFLOP/s"),
        ("MFU", f"{100 * report['mfu']:.1f} %"),
    ]
    for decode in report["decoding"]:
        rows.append(
            (f"decode beam {decode['beam_size']}",
             f"{decode['sentences_per_s']:.1f} sentences/s, {decode['target_tokens_per_s']:.0f} tokens/s")
        )
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
