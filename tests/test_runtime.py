"""Device, precision and RNG rules, and the code paths that only a GPU would take, reached on the CPU.

Every branch that depends on the device type or the dtype takes its decision from an explicit argument or from
the float input, so these tests drive the GPU branch on a CPU (a "meta" view of a tensor is off the CPU without
holding data); tests marked `cuda` repeat the checks for real on a GPU (skipped without one).
"""

from __future__ import annotations

import contextlib
import random
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from seq2seq.data.batching import collate, make_loader
from seq2seq.config import model_config, saved_config
from seq2seq.models import bahdanau, build_model, rnn
from seq2seq.runtime import (
    RuntimeSettingError, autocast, cpu_has_native_bf16, grad_scaler, resolve_device, resolve_precision, rng_state,
    seed_everything, set_rng_state,
)

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)
RECURRENT = {
    f"{name}_{cell}": {"name": name, "cell": cell, "embed_dim": 16, "hidden_size": 16, "encoder_layers": 2,
                       "decoder_layers": 2, "dropout": 0.0, "tie_output": False}
    for name in ("rnn", "bahdanau") for cell in ("gru", "lstm")
}


def _batch():
    examples = [{"src_ids": [5, 6, 7, 8], "tgt_ids": [9, 10, 11]}, {"src_ids": [12, 13], "tgt_ids": [14, 15, 16, 17]}]
    return collate(examples)


# ----------------------------------------------------------------------------- the recurrent models off the CPU


@pytest.mark.parametrize("key", list(RECURRENT))
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_recurrent_models_take_the_accelerator_branch_with_float_inputs(monkeypatch, key, precision):
    """Regression (5f3c432): off the CPU, `recurrent_precision` returns its input's dtype, and rnn.py passed it the
    token ids, so the GRU got int64 inputs ("RNN input dtype (torch.int64) does not match weight dtype") on every
    GPU. Here the CPU takes the branch a GPU takes; training and decoding must both work."""
    if precision == "bf16" and key.endswith("lstm") and not cpu_has_native_bf16():
        pytest.skip("oneDNN has no bf16 LSTM kernel for CPUs without native bf16 (cuDNN has one)")
    original = rnn.recurrent_precision
    accelerator_branch = lambda x: original(x.to("meta"))  # noqa: E731  (same tensor, seen off the CPU)
    monkeypatch.setattr(rnn, "recurrent_precision", accelerator_branch)
    monkeypatch.setattr(bahdanau, "recurrent_precision", accelerator_branch)
    torch.manual_seed(0)
    model = build_model(model_config(RECURRENT[key]), 20, 20).train()
    batch = _batch()
    with autocast(CPU, precision):
        logits = model(batch.src, batch.src_mask, batch.tgt_in).logits
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch.tgt_out.reshape(-1), ignore_index=0)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with autocast(CPU, precision), torch.inference_mode():
        log_probs, _, _ = model.eval().decode_step(model.encode(batch.src, batch.src_mask), batch.tgt_in[:, 0])
    assert log_probs.dtype == torch.float32 and torch.isfinite(log_probs).all()


def test_recurrent_precision_branches():
    embedded = torch.randn(2, 3)
    context, dtype = rnn.recurrent_precision(embedded)
    assert dtype == torch.float32 and isinstance(context, torch.autocast)  # CPU: float32, autocast switched off
    context, dtype = rnn.recurrent_precision(embedded.bfloat16().to("meta"))
    assert dtype == torch.bfloat16 and isinstance(context, contextlib.nullcontext)  # off the CPU: input dtype
    with pytest.raises(TypeError, match="float input, got torch.int64"):
        rnn.recurrent_precision(torch.tensor([[4, 5]]))


# ----------------------------------------------------------------------------- one rule for auto


@pytest.mark.parametrize(
    ("device", "requested", "native", "expected"),
    [
        (CPU, "auto", False, "fp32"), (CPU, "auto", True, "bf16"), (CPU, "bf16", True, "bf16"),
        (CPU, "fp32", False, "fp32"), (CUDA, "auto", True, "bf16"), (CUDA, "auto", False, "fp16"),
        (CUDA, "fp16", True, "fp16"), (CUDA, "fp32", True, "fp32"), (CUDA, "bf16", True, "bf16"),
    ],
)
def test_precision_rule(device, requested, native, expected):
    assert resolve_precision(requested, device, bf16_native=native) == expected


@pytest.mark.parametrize(
    ("device", "requested", "message"),
    [
        (CPU, "fp16", "--precision=fp16 needs a CUDA GPU"),
        (CPU, "bf16", "--precision=bf16 but this CPU has no native bfloat16"),
        (CUDA, "bf16", "--precision=bf16 but this GPU has no bfloat16 support"),
        (CPU, "fp8", "--precision='fp8' is not one of auto, bf16, fp16, fp32"),
    ],
)
def test_precisions_a_device_cannot_do_are_refused_naming_the_setting(device, requested, message):
    with pytest.raises(RuntimeSettingError, match=message):
        resolve_precision(requested, device, setting="--precision", bf16_native=False)


def test_device_rule(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == CPU
    with pytest.raises(RuntimeSettingError, match="trainer.device=cuda but no CUDA GPU is visible"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto", local_rank=3) == torch.device("cuda", 1)
    assert resolve_device("cpu") == CPU


def test_native_bf16_is_read_from_the_cpu_flags():
    assert cpu_has_native_bf16("flags\t\t: fpu sse avx2 amx_bf16 amx_tile\n")
    assert cpu_has_native_bf16("Features\t: fp asimd bf16\n")
    assert not cpu_has_native_bf16("flags\t\t: fpu sse avx2 fma\n")


def test_autocast_and_scaler_follow_the_precision():
    assert isinstance(autocast(CPU, "fp32"), contextlib.nullcontext)
    with autocast(CPU, "bf16"):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    assert grad_scaler(CPU, "bf16") is None and grad_scaler(CPU, "fp32") is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available. Disabling" on a machine without a GPU
        assert isinstance(grad_scaler(CUDA, "fp16"), torch.amp.GradScaler)


# ----------------------------------------------------------------------------- random state and loaders


def test_rng_state_round_trip_includes_named_generators():
    generator = torch.Generator().manual_seed(7)
    seed_everything(3)
    saved = rng_state({"loader": generator})
    expected = (random.random(), np.random.rand(), torch.rand(1), torch.rand(1, generator=generator))
    seed_everything(99)
    generator.manual_seed(99)
    set_rng_state(saved, {"loader": generator})
    assert (random.random(), np.random.rand(), torch.rand(1), torch.rand(1, generator=generator)) == expected


def test_loaders_never_draw_from_the_global_torch_rng():
    """DataLoader seeds each iterator from its generator; without its own it draws from the global RNG and shifts
    the dropout masks of the steps after it (so a resume that re-creates a loader would diverge)."""
    datasets = pytest.importorskip("datasets")
    split = datasets.Dataset.from_dict({"src_ids": [[5, 6], [7], [8, 9, 10]], "tgt_ids": [[5], [6, 7], [8]]})
    loader = make_loader(split, max_tokens=8, shuffle=True, seed=1)
    before = torch.get_rng_state()
    assert sum(batch.size for batch in loader) == 3
    assert torch.equal(torch.get_rng_state(), before)


# ----------------------------------------------------------------------------- pinned batches


def test_batch_pin_memory_pins_every_tensor(monkeypatch):
    """The DataLoader calls `pin_memory()` on batch objects; without the method pinning silently did nothing."""
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda tensor, *args: pinned.append(tensor) or tensor.clone())
    batch = _batch()
    copy = batch.pin_memory()
    assert len(pinned) == 6 and torch.equal(copy.src, batch.src) and copy.src is not batch.src


@pytest.mark.cuda
def test_batch_pin_memory_on_a_gpu_machine():
    copy = _batch().pin_memory()
    assert copy.src.is_pinned() and copy.tgt_out.is_pinned()
    assert copy.to("cuda", non_blocking=True).src.device.type == "cuda"


@pytest.mark.cuda
@pytest.mark.parametrize("key", list(RECURRENT))
@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_recurrent_models_train_on_a_gpu(key, precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    model = build_model(model_config(RECURRENT[key]), 20, 20).to(CUDA).train()
    batch = _batch().to(CUDA)
    with autocast(CUDA, precision):
        logits = model(batch.src, batch.src_mask, batch.tgt_in).logits
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch.tgt_out.reshape(-1), ignore_index=0)
    loss.backward()
    assert torch.isfinite(loss)


# ----------------------------------------------------------------------------- the fp16 update path


def test_train_step_with_a_gradient_scaler_runs_on_the_cpu():
    """The branch fp16 training takes (loss scaling, unscale before clipping, the scaler's step), on the CPU."""
    from seq2seq.training.update import Update

    cfg = saved_config({
        "optim": {"lr": 1e-3, "betas": [0.9, 0.98], "eps": 1e-9, "weight_decay": 0.0, "schedule": "constant",
                  "warmup_steps": 0},
        "trainer": {"compile": False, "label_smoothing": 0.1, "grad_clip": 1.0},
    })
    torch.manual_seed(0)
    model = build_model(model_config({"name": "transformer", "d_model": 16, "num_heads": 2, "encoder_layers": 1,
                                      "decoder_layers": 1, "ff_dim": 32, "dropout": 0.0}), 20, 20)
    step = Update.from_config(model, cfg, CPU, "fp16", data_parallel=False, total_steps=None)
    step.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    before = [p.detach().clone() for p in model.parameters()]
    result = step([_batch(), _batch()])
    assert result.tokens == 2 * _batch().num_tgt_tokens and torch.isfinite(result.loss_sum)
    assert result.nonfinite.item() == 0 and result.finite.item()
    assert any(not torch.equal(old, new) for old, new in zip(before, model.parameters()))
    assert step.scaler.get_scale() == 2.0**10  # no overflow: the scale stays
