"""Training and decoding speed of one model configuration, timing the trainer's own step, with model FLOPs utilisation.

    python scripts/benchmark.py model=transformer
    python scripts/benchmark.py model=transformer trainer.precision=bf16 trainer.device=cuda --synthetic \
        model.d_model=512 model.num_heads=8 model.encoder_layers=6 model.decoder_layers=6 model.ff_dim=2048

Positional arguments are Hydra overrides of configs/train.yaml, so the benchmark measures what
`python -m seq2seq.train` with the same overrides would train: the same device and precision rule
(`trainer.device` / `trainer.precision`, both `auto` by default), the same optimizer, scaler, clipping,
accumulation and `trainer.compile`, and the same `Update` object the trainer calls at every update.
Prints a table and writes JSON (--json).

What is measured, on the trainer's own batches of the training split (or synthetic ones of Tatoeba-like lengths):
  - throughput of `Update` as the loop calls it (no synchronisation inside, one at the end): target
    tokens/s, source+target tokens/s, sentences/s (padding excluded);
  - time per update split into data (batch to device), forward, backward and optimizer, from a few more updates
    run through the step's own four phases with a synchronisation after each;
  - peak memory: resident set size on the CPU, max allocated on CUDA;
  - model FLOPs per target token, counted by torch's FlopCounterMode over one real update (matrix products
    only), and MFU = achieved model FLOP/s / the matrix-multiply peak measured here on the same device and
    in the dtype of the precision in use;
  - decoding speed with a trained checkpoint (--checkpoint) on test sentences: greedy and beam 5, sentences/s and
    target tokens/s, per wall-clock second and per CPU second of this process (steadier on a shared machine), text
    only as `seq2seq.evaluate` decodes; with --int8 also the Linear layers quantised to int8 (CPU), with the
    share of outputs that stay the same (an untrained model emits arbitrary lengths, so decoding is only timed with
    a checkpoint); with --ctranslate2 also the Transformer exported to CTranslate2, computing in float32 and in
    int8, on the same sentences with the same share. --decode times decoding alone.
"""

from __future__ import annotations

from seq2seq.allocator import prepare_memory

if __name__ == "__main__":
    prepare_memory()  # the trainer's allocator and oneDNN cache: re-execute before torch is imported (below)

import argparse
import contextlib
import dataclasses
import itertools
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from torch.utils.flop_counter import FlopCounterMode

from seq2seq.checkpoint import load_model
from seq2seq.config import check_config
from seq2seq.data.batching import Batch, collate, padded_length
from seq2seq.errors import UsageError
from seq2seq.export import export
from seq2seq.inference.ctranslate2_engine import CTranslate2Decoder
from seq2seq.models import build_model, count_parameters
from seq2seq.paths import CONFIG_DIR
from seq2seq.inference.predict import quantize_int8, translate_sentences
from seq2seq.runtime import (
    AUTOCAST_DTYPES, RuntimeSettingError, configure_device, device_name, resolve_device, resolve_precision,
    seed_everything, synchronize,
)
from seq2seq.training.update import Update


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=bahdanau trainer.precision=bf16")
    parser.add_argument("--steps", type=int, default=30, help="timed updates")
    parser.add_argument("--warmup", type=int, default=5, help="untimed updates first (allocator, kernels, compile)")
    parser.add_argument("--phase-steps", type=int, default=5, help="updates timed phase by phase (0: skip)")
    parser.add_argument("--synthetic", action="store_true", help="random tokens with Tatoeba-like lengths")
    parser.add_argument("--checkpoint", type=Path, default=None, help="trained checkpoint whose decoding to time")
    parser.add_argument("--decode-sentences", type=int, default=1500, help="test sentences to decode")
    parser.add_argument("--decode", action="store_true", help="time decoding only (needs --checkpoint)")
    parser.add_argument("--int8", action="store_true", help="also decode with int8 Linear layers (CPU only)")
    parser.add_argument("--ctranslate2", action="store_true",
                        help="also decode with the checkpoint exported to CTranslate2, in float32 and int8")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return parser.parse_intermixed_args()


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


def real_batches(cfg, count: int) -> tuple[list[Batch], object]:
    """The trainer's first `count` batches (same loader, sampler, seed and epoch), and the prepared data."""
    from seq2seq.data.batching import make_loader
    from seq2seq.data.prepare import prepare_data

    data = prepare_data(cfg)
    loader = make_loader(
        data.splits["train"], cfg.trainer.max_tokens, shuffle=True, seed=cfg.trainer.seed,
        pad_multiple=cfg.trainer.pad_multiple,
    )
    return list(itertools.islice(itertools.cycle(loader), count)), data


def synthetic_batches(
    max_tokens: int, count: int, src_vocab: int, tgt_vocab: int, seed: int, pad_multiple: int
) -> list[Batch]:
    """Batches of random ids whose lengths follow Tatoeba's (median ~10 target pieces, up to ~40), padded and budgeted
    as the trainer's sampler does."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        length = int(torch.randint(6, 40, (1,), generator=generator))
        size = max(1, max_tokens // padded_length(length + 1, pad_multiple))
        examples = [
            {
                "src_ids": torch.randint(4, src_vocab, (length,), generator=generator).tolist(),
                "tgt_ids": torch.randint(4, tgt_vocab, (length,), generator=generator).tolist(),
                "index": i,
            }
            for i in range(size)
        ]
        batches.append(collate(examples, pad_multiple))
    return batches


def count_flops(update: Update, window: list[Batch]) -> int:
    """Forward + backward FLOPs of one real update (matrix products, attention included), counted by torch itself
    on the uncompiled model (the counter cannot see inside compiled graphs; the FLOPs are the same)."""
    counter = FlopCounterMode(display=False)
    with counter:
        dataclasses.replace(update, train_model=update.model)(window)
    return counter.get_total_flops()


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_training(update: Update, windows: list[list[Batch]]) -> dict:
    """Updates exactly as the training loop makes them, synchronised only before and after."""
    synchronize(update.device)
    start = time.perf_counter()
    losses = [update(window).loss_sum for window in windows]
    synchronize(update.device)
    seconds = time.perf_counter() - start
    if not all(torch.isfinite(torch.stack(losses)).tolist()):
        sys.exit("benchmark: a training loss was not finite; the figures would be meaningless")
    batches = [batch for window in windows for batch in window]
    tgt_tokens = sum(batch.num_tgt_tokens for batch in batches)
    src_tokens = sum(batch.num_src_tokens for batch in batches)
    return {
        "steps": len(windows),
        "seconds": seconds,
        "target_tokens_per_s": tgt_tokens / seconds,
        "tokens_per_s": (src_tokens + tgt_tokens) / seconds,
        "sentences_per_s": sum(batch.size for batch in batches) / seconds,
        "target_tokens_per_step": tgt_tokens / len(windows),
    }


def time_phases(update: Update, windows: list[list[Batch]]) -> dict[str, float]:
    """Mean ms per update in each phase of the step, synchronising around each (so slightly slower overall)."""
    phases: dict[str, float] = {"data": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0}

    @contextlib.contextmanager
    def timed(name: str):
        synchronize(update.device)
        start = time.perf_counter()
        yield
        synchronize(update.device)
        phases[name] += time.perf_counter() - start

    for window in windows:
        update(window, phase=timed)
    return {name: 1000 * seconds / len(windows) for name, seconds in phases.items()}


def benchmark_decoding(model, src_tok, tgt_tok, sentences, device, precision, beam_size,
                       decoder=None) -> tuple[dict, list[str]]:
    """Figures of one decoding of `sentences` (by our search, or by `decoder`), and its translations."""
    engine = {"decoder": decoder} if decoder is not None else {}
    synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    outputs = list(
        translate_sentences(
            model, src_tok, tgt_tok, sentences, beam_size=beam_size, device=device, precision=precision,
            attention=False, **engine,
        )
    )
    synchronize(device)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    tokens = sum(len(t.hypotheses[0].pieces) for t in outputs)
    figures = {
        "beam_size": beam_size, "sentences_per_s": len(outputs) / seconds, "target_tokens_per_s": tokens / seconds,
        "sentences_per_cpu_s": len(outputs) / cpu_seconds,
    }
    return figures, [t.text for t in outputs]


def decoding_figures(args: argparse.Namespace, sentences: list[str], device: torch.device, precision: str) -> list:
    """Greedy and beam 5 with the checkpoint, with --int8 the same with its Linear layers in int8, and with
    --ctranslate2 its CTranslate2 export computing in float32 and in int8; each beside the first (ours)."""
    trained = load_model(args.checkpoint, device)
    models = {"fp32" if precision == "fp32" else precision: (trained.model, precision, None)}
    if args.int8:
        if device.type != "cpu":
            sys.exit("benchmark: --int8 quantises for CPU inference; add trainer.device=cpu")
        models["int8"] = (quantize_int8(trained.model), "fp32", None)
    if args.ctranslate2:
        with tempfile.TemporaryDirectory(prefix="benchmark-ctranslate2-") as folder:  # read whole by each Translator
            try:
                exported = export(trained, args.checkpoint, Path(folder) / "model")
            except UsageError as error:
                sys.exit(f"benchmark: {error}")
            for compute_type in ("float32", "int8"):
                decoder = CTranslate2Decoder(exported, trained.src_tokenizer, trained.tgt_tokenizer, device,
                                             compute_type, torch.get_num_threads())
                models[f"ctranslate2 {compute_type}"] = (trained.model, "fp32", decoder)
    for model, model_precision, decoder in models.values():  # untimed: thread pools, kernels, first allocations
        benchmark_decoding(model, trained.src_tokenizer, trained.tgt_tokenizer, sentences[:16], device,
                           model_precision, 5, decoder)
    decoding = []
    for beam in (1, 5):
        reference = None
        for name, (model, model_precision, decoder) in models.items():
            figures, texts = benchmark_decoding(model, trained.src_tokenizer, trained.tgt_tokenizer, sentences,
                                                device, model_precision, beam, decoder)
            reference = reference or texts
            same = sum(a == b for a, b in zip(reference, texts)) / max(len(texts), 1)
            decoding.append({"weights": name, **figures, "same_output_share": same})
    return decoding


def main() -> None:
    args = parse_args()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = check_config(compose(config_name="train", overrides=args.overrides))
    try:
        device = resolve_device(cfg.trainer.device)
        precision = resolve_precision(cfg.trainer.precision, device)
    except RuntimeSettingError as error:
        sys.exit(f"benchmark: {error}")
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    configure_device(device)
    seed_everything(cfg.trainer.seed)
    if args.decode or args.int8 or args.ctranslate2:
        if args.checkpoint is None:
            sys.exit("benchmark: --decode, --int8 and --ctranslate2 time a trained checkpoint's decoding; "
                     "add --checkpoint PATH")
        if args.synthetic:
            sys.exit("benchmark: --checkpoint decodes real test sentences; drop --synthetic")
    report = {"device": device_name(device), "precision": precision, "model": cfg.model.name,
              "overrides": args.overrides}
    if not args.decode:
        report |= training_figures(args, cfg, device, precision)
    if args.checkpoint is not None:
        from seq2seq.data.prepare import prepare_data

        sentences = list(prepare_data(cfg).splits["test"]["src"])[: args.decode_sentences]
        report["decoding"] = decoding_figures(args, sentences, device, precision)
    report |= {"torch": torch.__version__, "threads": torch.get_num_threads()}
    print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}", file=sys.stderr)


def training_figures(args: argparse.Namespace, cfg, device: torch.device, precision: str) -> dict:
    """Throughput, phases, memory, FLOPs and MFU of the trainer's own step."""
    accumulate = cfg.trainer.accumulate
    count = accumulate * (1 + args.warmup + args.steps + args.phase_steps)  # +1: the FLOP-counting update
    if args.synthetic:
        src_vocab, tgt_vocab = cfg.tokenizer.src_vocab_size, cfg.tokenizer.tgt_vocab_size
        batches = synthetic_batches(
            cfg.trainer.max_tokens, count, src_vocab, tgt_vocab, cfg.trainer.seed, cfg.trainer.pad_multiple
        )
    else:
        batches, data = real_batches(cfg, count)
        src_vocab, tgt_vocab = data.src_tokenizer.vocab_size, data.tgt_tokenizer.vocab_size
    windows = [batches[i : i + accumulate] for i in range(0, count, accumulate)]

    model = build_model(cfg.model, src_vocab, tgt_vocab).to(device)
    update = Update.from_config(model, cfg, device, precision, data_parallel=False, total_steps=None)
    flops_per_tgt_token = count_flops(update, windows[0]) / sum(batch.num_tgt_tokens for batch in windows[0])
    for window in windows[1 : 1 + args.warmup]:
        update(window)
    timed = windows[1 + args.warmup : 1 + args.warmup + args.steps]
    training = time_training(update, timed)
    training["ms_per_step"] = time_phases(update, windows[1 + args.warmup + args.steps :]) if args.phase_steps else {}
    peak = matmul_peak(device, AUTOCAST_DTYPES.get(precision, torch.float32))
    achieved = flops_per_tgt_token * training["target_tokens_per_s"]
    return {
        "compile": cfg.trainer.compile,
        "parameters": count_parameters(model),
        "max_tokens": cfg.trainer.max_tokens,
        "accumulate": accumulate,
        "data": "synthetic" if args.synthetic else cfg.data.name,
        "training": training,
        "model_flops_per_target_token": flops_per_tgt_token,
        "achieved_model_tflops": achieved / 1e12,
        "matmul_peak_tflops": peak / 1e12,
        "mfu": achieved / peak,
        "peak_memory_mib": peak_memory_mib(device),
    }


def print_table(report: dict) -> None:
    rows = [
        ("device", f"{report['device']} ({report['threads']} threads), {report['precision']}"
                   f"{', compiled' if report.get('compile') else ''}"),
    ]
    if "training" in report:
        rows += training_rows(report)
    for decode in report.get("decoding", []):
        rows.append(
            (f"decode beam {decode['beam_size']}, {decode['weights']}",
             f"{decode['sentences_per_s']:.1f} sentences/s ({decode['sentences_per_cpu_s']:.1f} per CPU second), "
             f"{decode['target_tokens_per_s']:.0f} tokens/s, {100 * decode['same_output_share']:.1f} % same output")
        )
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def training_rows(report: dict) -> list[tuple[str, str]]:
    training = report["training"]
    return [
        ("model", f"{report['model']}, {report['parameters'] / 1e6:.2f} M parameters"),
        ("batches", f"{report['data']}, max_tokens {report['max_tokens']} x {report['accumulate']}, "
                    f"{training['target_tokens_per_step']:.0f} real target tokens/step"),
        ("target tokens/s", f"{training['target_tokens_per_s']:,.0f}"),
        ("src+tgt tokens/s", f"{training['tokens_per_s']:,.0f}"),
        ("sentences/s", f"{training['sentences_per_s']:,.1f}"),
        ("ms/step", " ".join(f"{name} {ms:.1f}" for name, ms in training["ms_per_step"].items()) or "not measured"),
        ("peak memory", f"{report['peak_memory_mib']:,.0f} MiB"),
        ("model FLOPs/target token", f"{report['model_flops_per_target_token'] / 1e6:.1f} M"),
        ("achieved", f"{report['achieved_model_tflops']:.3f} TFLOP/s"),
        ("matmul peak (measured)", f"{report['matmul_peak_tflops']:.3f} TFLOP/s"),
        ("MFU", f"{100 * report['mfu']:.1f} %"),
    ]


if __name__ == "__main__":
    main()
