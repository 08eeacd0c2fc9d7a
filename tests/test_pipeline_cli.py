"""The seeds' API (pipeline, encode_image(s), create_glm4v_vision_encoder) and the glm4v-fast CLI."""
import os
from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import glm4v_fast as gf
from glm4v_fast.cli import EXAMPLES, main
from glm4v_fast.reference import ReferenceVisionModel
from _tiny import CONFIGS, rel_err, save_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=1, std=0.02)


@pytest.fixture(scope="module")
def encoder(checkpoint):
    return gf.create_glm4v_vision_encoder(checkpoint=checkpoint, device="cpu")


def _images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in [(60, 90), (120, 40), (33, 33)]]


def test_create_encoder_from_checkpoint(encoder):
    config, model, processor = encoder
    assert config == gf.VisionConfig(**CONFIGS["tiny"])
    assert model.dtype == torch.float32 and not model.training
    assert isinstance(processor, gf.VisionProcessor)


@pytest.mark.parametrize("layout", ["preprocessor_config.json", "processor_config.json", "none"])
def test_create_encoder_reads_the_checkpoints_processor_config(checkpoint, tmp_path, layout):
    """transformers 5 writes the processor settings nested in processor_config.json; both layouts are read."""
    import json
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint, ckpt)
    for name in ("preprocessor_config.json", "video_preprocessor_config.json"):
        (ckpt / name).unlink(missing_ok=True)
    size = {"shortest_edge": 3136, "longest_edge": 200704}
    image = dict(gf.VisionProcessor(size=size).to_dict())
    if layout == "preprocessor_config.json":
        (ckpt / layout).write_text(json.dumps(image))
    elif layout == "processor_config.json":
        (ckpt / layout).write_text(json.dumps({"image_processor": image}))
    _, _, processor = gf.create_glm4v_vision_encoder(checkpoint=ckpt, device="cpu", dtype="float32")
    assert processor.size == (size if layout != "none" else gf.VisionProcessor().size)


def test_pipeline_equals_reference_per_image(encoder):
    config, model, processor = encoder
    pipe = gf.GLM4VEmbeddingPipeline(model=model, processor=processor)
    images = _images()
    out = pipe.extract_image_embeddings(images, return_dict=True, batch_size=2)
    ref = ReferenceVisionModel(config).eval()
    ref.load_state_dict(model.state_dict())
    assert len(out["embeddings"]) == 3 and out["embedding_dim"] == config.out_hidden_size
    for image, emb, grid, patches in zip(images, out["embeddings"], out["grid_thw"], out["num_patches"]):
        alone = processor(images=[image])
        assert torch.equal(alone["image_grid_thw"][0], grid) and patches == int(grid.prod())
        with torch.no_grad():
            expected = ref(alone["pixel_values"], alone["image_grid_thw"])
        assert emb.shape == (patches // 4, config.out_hidden_size)
        assert rel_err(emb, expected) <= 1e-5


def test_encode_image_and_images(encoder, tmp_path):
    _, model, processor = encoder
    images = _images()
    path = tmp_path / "a.png"
    images[0].save(path)
    one = gf.encode_image(str(path), model=model, processor=processor)
    many = gf.encode_images([path, images[1], images[2]], batch_size=2, model=model, processor=processor)
    assert len(many) == 3
    assert torch.allclose(one, many[0], rtol=1e-5, atol=1e-6)
    assert torch.allclose(many[1], gf.encode_image(images[1], model=model, processor=processor), rtol=1e-5, atol=1e-6)


def test_video_embeddings(encoder):
    config, model, processor = encoder
    pipe = gf.GLM4VEmbeddingPipeline(model=model, processor=processor)
    video = np.random.default_rng(0).integers(0, 255, (8, 56, 84, 3), dtype=np.uint8)
    out = pipe.extract_video_embeddings(video, video_metadata={"fps": 4, "total_num_frames": 8}, return_dict=True)
    (emb,) = out["embeddings"]
    grid = out["grid_thw"][0]
    assert emb.shape == (int(grid.prod()) // 4, config.out_hidden_size)
    assert len(out["timestamps"][0]) == int(grid[0])


def test_pipeline_bad_input(encoder):
    _, model, processor = encoder
    pipe = gf.GLM4VEmbeddingPipeline(model=model, processor=processor)
    with pytest.raises(ValueError, match="no images"):
        pipe.extract_image_embeddings([])
    with pytest.raises(ValueError, match="batch_size"):
        pipe.extract_image_embeddings(_images(), batch_size=0)
    with pytest.raises(FileNotFoundError):
        pipe.extract_image_embeddings(["/nonexistent/x.png"])


def test_random_weights_default_warns():
    with pytest.warns(UserWarning, match="RANDOM"):
        config, model, _ = gf.create_glm4v_vision_encoder(config=CONFIGS["tiny"], device="cpu")
    assert model.config == config


# ----------------------------------------------------------------------------------------------- CLI
def test_cli_info(capsys):
    assert main(["info"]) == 0
    assert "attention backends" in capsys.readouterr().out


def test_cli_demo_on_examples(checkpoint, capsys):
    assert main(["demo", "--checkpoint", str(checkpoint)]) == 0
    out = capsys.readouterr().out
    for name in sorted(os.listdir(EXAMPLES)):
        assert name in out
    errors = [float(line.split()[-1]) for line in out.splitlines() if line.split() and line.split()[0] in os.listdir(EXAMPLES)]
    assert errors and max(errors) <= 1e-5
    # The last line is the verdict: what was shown, against which tolerance, and what to try next.
    verdict = out.splitlines()[-1]
    assert verdict.startswith("PASS: the fast encoder agrees with the float32 reference (worst max relative error ")
    assert "tolerance: 1e-05" in verdict and "in float32" in verdict
    assert "Next: --dtype bfloat16" in verdict and f"glm4v-fast serve --checkpoint {checkpoint}" in verdict


def test_cli_demo_verdict_fails_beyond_the_tolerance(checkpoint, capsys, monkeypatch):
    import glm4v_fast.cli as cli

    monkeypatch.setattr(cli, "DEMO_FLOAT32_TOLERANCE", 1e-9)
    assert main(["demo", "--checkpoint", str(checkpoint)]) == 1
    verdict = capsys.readouterr().out.splitlines()[-1]
    assert verdict.startswith("FAIL: the fast encoder does NOT agree") and "tolerance: 1e-09" in verdict


def test_cli_demo_in_bfloat16_judges_against_the_precision(checkpoint, capsys):
    """In bf16 the tolerance is twice the error of the reference itself run in bf16: the precision's share."""
    assert main(["demo", "--checkpoint", str(checkpoint), "--dtype", "bfloat16"]) == 0
    verdict = capsys.readouterr().out.splitlines()[-1]
    assert verdict.startswith("PASS") and "twice the error of the reference itself in bfloat16" in verdict
    assert "Next: --dtype float32" in verdict


def test_cli_info_says_where_the_triton_kernels_run(capsys):
    from glm4v_fast import kernels

    assert main(["info"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("triton kernels:"))
    if not kernels.triton_available():
        assert "not installed" in line
    elif torch.cuda.is_available():
        assert "run on cuda" in line
    elif kernels.interpreter_enabled():     # the test suite's setting on CPU
        assert "run on cpu in triton's interpreter" in line
    if not torch.cuda.is_available() and kernels.triton_available():
        # A CPU-only machine without the interpreter: the kernels are installed but cannot run here.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        result = subprocess.run([sys.executable, "-m", "glm4v_fast", "info"], capture_output=True, text=True,
                                timeout=120, env=env)
        line = next(l for l in result.stdout.splitlines() if l.startswith("triton kernels:"))
        assert "available" not in line
        assert "run on CUDA devices only and this machine has none: on cpu the PyTorch kernels run" in line


def test_cli_encode(checkpoint, tmp_path, capsys):
    for i, image in enumerate(_images()):
        image.save(tmp_path / f"img{i}.png")
    (tmp_path / "sub").mkdir()
    _images()[0].save(tmp_path / "sub" / "deep.jpg")
    out = tmp_path / "out" / "emb.safetensors"
    code = main(["encode", str(tmp_path / "img*.png"), str(tmp_path / "sub"), "--out", str(out),
                 "--checkpoint", str(checkpoint), "--batch-size", "2", "--device", "cpu"])
    assert code == 0
    _, model, processor = gf.create_glm4v_vision_encoder(checkpoint=checkpoint, device="cpu")
    with safe_open(out, framework="pt") as f:
        keys = set(f.keys())
        path = str(tmp_path / "img1.png")
        assert {path, f"{path}::grid_thw", str(tmp_path / "sub" / "deep.jpg")} <= keys
        expected = gf.encode_image(path, model=model, processor=processor)
        assert torch.allclose(f.get_tensor(path), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("argv, match", [
    (["encode", "/nonexistent.png", "--out", "x.safetensors"], "input file not found: '/nonexistent.png'"),
    (["encode", "/nonexistent/*.png", "--out", "x.safetensors"], "no file matches"),
    (["encode", "https://example.com/cat.jpg", "--out", "x.safetensors"],
     "input 'https://example.com/cat.jpg' is a URL: glm4v-fast does not fetch URLs"),
])
def test_cli_encode_errors(argv, match, capsys):
    assert main(argv) == 2
    assert match in capsys.readouterr().err


def test_cli_entry_point_runs_as_module():
    result = subprocess.run([sys.executable, "-m", "glm4v_fast", "info"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "glm4v-fast" in result.stdout


# ----------------------------------------------------------------------------------------------- issue 10
def _save_images(folder):
    for i, image in enumerate(_images()):
        image.save(folder / f"img{i}.png")
    return [str(folder / f"img{i}.png") for i in range(3)]


def test_cli_encode_keeps_going_past_bad_inputs(checkpoint, tmp_path, capsys, monkeypatch):
    """One bad file no longer loses the run: the good ones are written, every bad one is listed, exit 1."""
    good = _save_images(tmp_path)
    (tmp_path / "._img0.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")   # AppleDouble
    (tmp_path / "empty.png").write_bytes(b"")
    Image.new("RGB", (600, 2)).save(tmp_path / "strip.png")                               # aspect ratio 300
    Image.new("RGB", (200, 200)).save(tmp_path / "big.png")                               # over the limit below
    (tmp_path / "broken.mp4").write_bytes(b"not a video")                                 # a bad video after them
    bad = ["._img0.png", "empty.png", "strip.png", "big.png", "broken.mp4"]
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "emb.safetensors"
    # The same file named three ways (relative, ./x, absolute) is encoded once, under its first spelling.
    code = main(["encode", ".", "img1.png", "./img1.png", str(tmp_path / "img1.png"), "--out", str(out),
                 "--checkpoint", str(checkpoint), "--batch-size", "2", "--max-image-pixels", "30000"])
    captured = capsys.readouterr()
    assert code == 1
    for name in bad:
        assert f"failed: {name}: " in captured.err
    assert "aspect ratio must be at most 200" in captured.err and "600x2" in captured.err
    assert "--max-image-pixels" in captured.err
    assert "7/7 [" in captured.err and "image/s" in captured.err        # the progress bar counts images
    summary = next(line for line in captured.out.splitlines() if line.startswith("encoded "))
    assert summary.startswith("encoded 3 images (") and "images/s" in summary and "5 failed" in summary

    _, model, processor = gf.create_glm4v_vision_encoder(checkpoint=checkpoint, device="cpu")
    with safe_open(out, framework="pt") as f:
        metadata = f.metadata()
        keys = set(f.keys())
        assert keys == {k for name in ("img0.png", "img1.png", "img2.png") for k in (name, f"{name}::grid_thw")}
        for name in ("img0.png", "img1.png", "img2.png"):
            expected = gf.encode_image(str(tmp_path / name), model=model, processor=processor)
            assert torch.allclose(f.get_tensor(name), expected, rtol=1e-5, atol=1e-6)
    import json
    assert sorted(json.loads(metadata["failed"])) == sorted(bad)
    assert len(good) == len(json.loads(metadata["inputs"])) == 3


def test_cli_encode_failures_name_the_file_not_an_index(checkpoint, tmp_path, capsys, monkeypatch):
    """The library numbers images in its list ("image 3 ('strip.png')"); the CLI user named files."""
    monkeypatch.chdir(tmp_path)
    _save_images(tmp_path)
    Image.new("RGB", (600, 2)).save(tmp_path / "strip.png")
    out = tmp_path / "x.safetensors"
    assert main(["encode", "img0.png", "img1.png", "img2.png", "strip.png", "--out", str(out),
                 "--checkpoint", str(checkpoint)]) == 1
    err = capsys.readouterr().err
    assert "failed: strip.png: ValueError: image 'strip.png': aspect ratio must be at most 200" in err
    assert "image 3" not in err
    with safe_open(out, framework="pt") as f:
        import json
        assert json.loads(f.metadata()["failed"])["strip.png"].startswith("ValueError: image 'strip.png':")


def test_cli_encode_garbage_with_a_jpeg_header_says_so(checkpoint, tmp_path, capsys):
    """A file that starts like a JPEG and is not one is reported as such, not as PIL's "Truncated File Read"."""
    paths = _save_images(tmp_path)[:1]
    (tmp_path / "fake.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"not really a jpeg" * 3)
    out = tmp_path / "x.safetensors"
    assert main(["encode", *paths, str(tmp_path / "fake.jpg"), "--out", str(out), "--checkpoint", str(checkpoint)]) == 1
    err = capsys.readouterr().err
    assert "fake.jpg" in err and "starts like a JPEG file but is truncated or not a valid JPEG" in err


def test_cli_encode_dtypes_and_model_options(checkpoint, tmp_path, capsys):
    paths = _save_images(tmp_path)[:2]
    out = tmp_path / "bf16.safetensors"
    assert main(["encode", *paths, "--out", str(out), "--checkpoint", str(checkpoint), "--dtype", "bfloat16",
                 "--attn-backend", "sdpa", "--kernels", "torch"]) == 0
    assert "(float32; model ran in bfloat16)" in capsys.readouterr().out
    with safe_open(out, framework="pt") as f:
        assert f.get_tensor(paths[0]).dtype == torch.float32
        assert (f.metadata()["dtype"], f.metadata()["model_dtype"]) == ("float32", "bfloat16")
    assert main(["encode", paths[0], "--out", str(out), "--checkpoint", str(checkpoint), "--out-dtype",
                 "bfloat16"]) == 0
    with safe_open(out, framework="pt") as f:
        assert f.get_tensor(paths[0]).dtype == torch.bfloat16
    with pytest.raises(SystemExit):
        main(["encode", paths[0], "--out", str(out), "--attn-backend", "fastest"])
    assert "invalid choice" in capsys.readouterr().err


def test_cli_default_pixel_limit_matches_the_library():
    from glm4v_fast.cli import DEFAULT_MAX_IMAGE_PIXELS
    from glm4v_fast.imageio import DEFAULT_MAX_IMAGE_PIXELS as library_default

    assert DEFAULT_MAX_IMAGE_PIXELS == library_default


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
@pytest.mark.parametrize("argv", [["encode", "x.png", "--out", "x.safetensors"], ["demo"], ["serve"]])
@pytest.mark.parametrize("device", ["cuda", "gpu", "cuda:1"])
def test_cli_gpu_device_without_gpu_is_one_line(argv, device, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (40, 40)).save(tmp_path / "x.png")
    assert main(argv + ["--device", device]) == 2
    if argv[0] != "serve":      # the server logs it instead
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "no CUDA device is available" in err


def test_resolve_device():
    from glm4v_fast.pipeline import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("gpu")


def test_cli_help_imports_no_torch():
    """`glm4v-fast --help` and argument errors stay quick: building the parser imports neither torch nor the
    bench module (which imports torch at its top)."""
    code = ("import sys\nfrom glm4v_fast.cli import main\n"
            "for argv in (['--help'], ['encode', '--help'], ['info', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print('torch' in sys.modules, 'glm4v_fast.bench' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "False False"
    assert "--max-image-pixels" in result.stdout and "exit status is 1" in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a CUDA device the ops register for Inductor on purpose")
def test_kernels_import_without_inductor_on_a_cpu_machine():
    """`glm4v-fast info` imports the kernels: on a machine that cannot launch compiled kernels their ops must not
    register through torch.library.triton_op, whose Inductor import cost over a second."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import sys, glm4v_fast.kernels\nprint('torch._inductor' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "False"


def test_cli_info_into_a_closed_pipe():
    """`glm4v-fast info | head -1`: a reader that goes away ends the command quietly, not in a traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "glm4v_fast", "info"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()             # before the command writes anything
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_iter_image_embeddings_skip_bad(encoder, monkeypatch):
    """Bad images and failed forwards are reported per image; the others come back as from the whole batch."""
    _, model, processor = encoder
    pipe = gf.GLM4VEmbeddingPipeline(model=model, processor=processor)
    images = _images() + [np.zeros((1, 300), np.uint8)] + _images()[:1]
    with pytest.raises(ValueError, match=r"image 3: aspect ratio"):     # numbered in the caller's list
        pipe.extract_image_embeddings(images, batch_size=2)
    results = list(pipe.iter_image_embeddings(images, batch_size=2, skip_bad=True))
    assert [r.index for r in results] == list(range(5))
    assert results[3].embedding is None and "aspect ratio" in results[3].error
    expected = pipe.extract_image_embeddings(_images(), batch_size=1)
    for r, e in zip(results[:3], expected):
        assert r.error is None and torch.allclose(r.embedding, e, rtol=1e-5, atol=1e-6)

    # A forward that fails for one image (think: out of memory on the largest) loses only that image.
    encode = pipe._encode

    def failing(pixel_values, grid):
        if (grid.prod(-1) == int(expected_grid.prod())).any():
            raise RuntimeError("out of memory")
        return encode(pixel_values, grid)

    expected_grid = processor(images=[_images()[1]])["image_grid_thw"][0]
    monkeypatch.setattr(pipe, "_encode", failing)
    results = list(pipe.iter_image_embeddings(_images(), batch_size=3, skip_bad=True))
    assert [r.error is None for r in results] == [True, False, True]
    assert "out of memory" in results[1].error
    assert torch.allclose(results[2].embedding, expected[2], rtol=1e-5, atol=1e-6)


def test_video_from_arrays(encoder):
    _, model, processor = encoder
    pipe = gf.GLM4VEmbeddingPipeline(model=model, processor=processor)
    video = np.random.default_rng(1).integers(0, 255, (4, 56, 56, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"video_metadata=\{'fps': \.\.\.\}.*do_sample_frames=False"):
        pipe.extract_video_embeddings(video)
    # The argument the message suggests is one the pipeline takes.
    every = pipe.extract_video_embeddings(video, do_sample_frames=False, return_dict=True)
    assert every["grid_thw"].tolist() == [[2, 4, 4]]
    sampled = pipe.extract_video_embeddings(video, video_metadata={"fps": 2}, return_dict=True)
    assert torch.allclose(sampled["embeddings"][0], every["embeddings"][0], rtol=1e-5, atol=1e-6)


def test_example_images_ship_in_the_wheel(checkpoint, tmp_path):
    """`glm4v-fast demo` after a normal install: the images it reads are package data inside the wheel, the build
    warns about nothing, and the installed copy runs the demo."""
    import shutil
    import zipfile

    assert EXAMPLES.parent == Path(gf.__file__).parent and len(list(EXAMPLES.iterdir())) == 4
    pytest.importorskip("setuptools", minversion="77", reason="the build backend pyproject.toml names")
    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"         # a copy, so that the build leaves nothing in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    shutil.copytree(root / "glm4v_fast", src / "glm4v_fast", ignore=shutil.ignore_patterns("__pycache__"))
    # -v: pip shows the build backend's own output, where setuptools prints its warnings.
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v",
                             "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    build_output = result.stdout + result.stderr
    for warning in ("absent from the `packages`", "Warning:", "InformationOnly", "!!"):
        assert warning not in build_output, build_output[build_output.find(warning) - 2000:][:4000]
    (wheel,) = (tmp_path / "dist").glob("glm4v_fast-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for image in EXAMPLES.iterdir():
        assert f"glm4v_fast/example_images/{image.name}" in names
    assert "glm4v_fast/kernels/rms_norm.py" in names

    # A normal (non-editable) install of the wheel, away from the checkout, runs the demo on its own images.
    target = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                             str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PYTHONPATH": str(target)}
    result = subprocess.run([str(target / "bin" / "glm4v-fast"), "demo", "--checkpoint", str(checkpoint)],
                            capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for image in EXAMPLES.iterdir():
        assert image.name in result.stdout
    assert result.stdout.splitlines()[-1].startswith("PASS")
    where = subprocess.run([sys.executable, "-c", "import glm4v_fast.cli as c; print(c.EXAMPLES)"],
                           capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert where.stdout.strip() == str(target / "glm4v_fast" / "example_images"), where.stderr


def test_cli_encode_interrupted_writes_what_is_done(checkpoint, tmp_path, capsys, monkeypatch):
    """Ctrl-C in the middle of a run keeps the finished embeddings (exit status 130)."""
    paths = _save_images(tmp_path)
    real = gf.GLM4VEmbeddingPipeline.iter_image_embeddings

    def interrupted(self, *args, **kwargs):
        results = real(self, *args, **kwargs)
        yield next(results)
        raise KeyboardInterrupt

    monkeypatch.setattr(gf.GLM4VEmbeddingPipeline, "iter_image_embeddings", interrupted)
    out = tmp_path / "partial.safetensors"
    assert main(["encode", *paths, "--out", str(out), "--checkpoint", str(checkpoint)]) == 130
    assert "interrupted: 2 inputs not encoded" in capsys.readouterr().err
    with safe_open(out, framework="pt") as f:
        assert set(f.keys()) == {paths[0], f"{paths[0]}::grid_thw"}
