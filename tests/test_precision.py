"""The dtype "auto" picks: the checkpoint's stored dtype where the device computes it natively, else float32; the
API logs the choice and the CLI prints it."""
import logging

import pytest
import torch
from PIL import Image

import glm4v_fast as gf
from glm4v_fast import precision
from glm4v_fast.cli import main
from glm4v_fast.precision import choose_dtype, cpu_native_dtypes
from _tiny import tiny_config

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def cpu_natively(monkeypatch):
    """Pretend this CPU multiplies exactly these reduced-precision dtypes natively."""
    def pretend(*dtypes):
        monkeypatch.setattr(precision, "cpu_native_dtypes", lambda: frozenset(dtypes))
    return pretend


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    model = gf.VisionModel(tiny_config()).to(torch.bfloat16)
    model.reset_parameters(seed=0)
    path = tmp_path_factory.mktemp("bf16")
    model.save_pretrained(path)
    return path


def test_cpu_without_native_bf16_computes_in_float32(cpu_natively):
    cpu_natively()
    choice = choose_dtype(CPU, torch.bfloat16)
    assert choice.dtype == torch.float32
    assert "stored dtype is bfloat16" in choice.reason and "no native bfloat16" in choice.reason
    assert "--dtype bfloat16" in choice.message()           # how to get the other one
    assert choose_dtype(CPU, None).dtype == torch.float32    # random weights too
    assert choose_dtype(CPU, torch.float16).dtype == torch.float32


def test_cpu_with_native_bf16_computes_in_the_stored_dtype(cpu_natively):
    cpu_natively(torch.bfloat16)
    choice = choose_dtype(CPU, torch.bfloat16)
    assert choice.dtype == torch.bfloat16 and "multiplies it natively" in choice.reason
    assert "--dtype float32" in choice.message()
    assert choose_dtype(CPU, None).dtype == torch.bfloat16   # random weights: the released checkpoints' dtype
    assert choose_dtype(CPU, torch.float16).dtype == torch.float32    # no native float16 on this CPU
    assert choose_dtype(CPU, torch.float32).dtype == torch.float32


def test_cuda_computes_in_the_stored_dtype(cpu_natively):
    cpu_natively()
    for stored in (torch.bfloat16, torch.float16, torch.float32):
        assert choose_dtype(CUDA, stored).dtype == stored
    assert choose_dtype(CUDA, None).dtype == torch.bfloat16
    assert choose_dtype(CUDA, torch.float64).dtype == torch.float32     # auto never picks float64


def test_cpu_probe_agrees_with_the_cpu_flags():
    flags = precision._cpuinfo_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags here")
    native = cpu_native_dtypes()
    if torch.bfloat16 in native:
        assert flags & {"amx_bf16", "avx512_bf16"}
    if not flags & {"amx_bf16", "avx512_bf16"}:
        assert torch.bfloat16 not in native


@pytest.mark.parametrize("native, expected", [((), torch.float32), ((torch.bfloat16,), torch.bfloat16)])
def test_create_encoder_auto_dtype_is_logged(bf16_checkpoint, cpu_natively, caplog, native, expected):
    cpu_natively(*native)
    with caplog.at_level(logging.INFO, logger="glm4v_fast"):
        _, model, _ = gf.create_glm4v_vision_encoder(checkpoint=bf16_checkpoint, device="cpu")
    assert model.dtype == expected
    (record,) = [r for r in caplog.records if "dtype auto" in r.getMessage()]
    assert f"dtype auto -> {str(expected).removeprefix('torch.')}" in record.getMessage()
    assert "stored dtype is bfloat16" in record.getMessage()
    # An explicit dtype is taken as given, and "auto" spelt out is the default.
    _, model, _ = gf.create_glm4v_vision_encoder(checkpoint=bf16_checkpoint, device="cpu", dtype="float32")
    assert model.dtype == torch.float32
    _, model, _ = gf.create_glm4v_vision_encoder(checkpoint=bf16_checkpoint, device="cpu", dtype="auto")
    assert model.dtype == expected


def test_cli_prints_the_dtype_choice(bf16_checkpoint, cpu_natively, tmp_path, capsys):
    Image.new("RGB", (56, 56), "red").save(tmp_path / "x.png")
    out = str(tmp_path / "x.safetensors")
    cpu_natively()
    assert main(["encode", str(tmp_path / "x.png"), "--out", out, "--checkpoint", str(bf16_checkpoint)]) == 0
    printed = capsys.readouterr().out
    assert "dtype=float32" in printed
    assert "dtype auto -> float32: the checkpoint's stored dtype is bfloat16, but this CPU has no native" in printed
    cpu_natively(torch.bfloat16)
    assert main(["encode", str(tmp_path / "x.png"), "--out", out, "--checkpoint", str(bf16_checkpoint)]) == 0
    printed = capsys.readouterr().out
    assert "dtype=bfloat16" in printed and "--dtype float32" in printed
    # A named dtype prints no choice.
    assert main(["encode", str(tmp_path / "x.png"), "--out", out, "--checkpoint", str(bf16_checkpoint),
                 "--dtype", "float32"]) == 0
    assert "dtype auto" not in capsys.readouterr().out
