"""Image preprocessing: parity with transformers' Glm4vImageProcessorPil, smart_resize, config I/O, bad input."""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from _property import HealthCheck, given, settings, st  # hypothesis, or stand-ins that skip only the property tests
from PIL import Image

import glm4v_fast as gf
from glm4v_fast.imageio import DEFAULT_MAX_IMAGE_PIXELS, load_image
from glm4v_fast.processing import DEFAULT_IMAGE_SIZE, VisionProcessor, smart_resize

EXAMPLES = Path(__file__).resolve().parents[1] / "glm4v_fast" / "example_images"
RELEASED = {"shortest_edge": 12544, "longest_edge": 9633792}  # the size in released preprocessor configs


def _transformers_version() -> tuple[int, ...]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return tuple(int(part) for part in version("transformers").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return (0,)


# transformers converts RGBA and single-channel arrays to RGB, and composites a PIL image's transparency onto
# white, only from 5.21 on; glm4v-fast follows 5.21+. Before it these inputs fail or keep the alpha channel's
# colours there, so the parity tests for them compare nothing meaningful.
needs_rgb_conversion = pytest.mark.skipif(
    _transformers_version() < (5, 21),
    reason="transformers < 5.21 does not convert alpha and single-channel inputs to RGB as 5.21+ (and glm4v-fast) do")


def _hf_module():
    pytest.importorskip("transformers")
    from transformers.models.glm4v import image_processing_pil_glm4v

    return image_processing_pil_glm4v


@pytest.fixture(scope="module")
def hf_cls():
    return _hf_module().Glm4vImageProcessorPil


def _photo(h: int, w: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    """Smooth gradients plus noise: closer to a photo than pure noise, with both edges and flat areas."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255.0 / max(w - 1, 1), yy * 255.0 / max(h - 1, 1), (xx + yy) % 97 * 2.6], -1)
    base = np.concatenate([base, np.full((h, w, max(channels - 3, 0)), 255.0)], -1)[..., :channels]
    noisy = base + rng.normal(0, 20, (h, w, channels))
    return noisy.clip(0, 255).astype(np.uint8)


def _assert_same(ours: dict, hf: dict) -> None:
    assert ours["pixel_values"].dtype == np.float32
    assert ours["pixel_values"].shape == hf["pixel_values"].shape
    np.testing.assert_array_equal(ours["image_grid_thw"], np.asarray(hf["image_grid_thw"]))
    assert np.abs(ours["pixel_values"] - np.asarray(hf["pixel_values"])).max() <= 1e-6


def _compare(hf_cls, images, hf_images=None, hf_kwargs=None, **kwargs):
    ours = VisionProcessor(**kwargs)(images=images, return_tensors="np")
    hf = hf_cls(**kwargs)(images=hf_images if hf_images is not None else images, return_tensors="np",
                          **(hf_kwargs or {}))
    _assert_same(ours, hf)
    return ours


# ---------------------------------------------------------------------------------------------------------------
# smart_resize


@pytest.mark.parametrize("hw, resized", [
    ((375, 500), (364, 504)),
    ((4000, 6000), (1792, 2688)),
    ((3000, 3000), (2184, 2184)),
    ((20, 300), (28, 420)),
    ((10, 10), (84, 84)),
])
def test_smart_resize_spec_table(hw, resized):
    assert smart_resize(2, *hw, min_pixels=RELEASED["shortest_edge"], max_pixels=RELEASED["longest_edge"]) == resized


def test_smart_resize_defaults_are_class_defaults():
    assert smart_resize(2, 4000, 6000) == smart_resize(2, 4000, 6000, 2, 28, 12544, 28 * 28 * 15000)
    h, w = smart_resize(2, 4000, 6000)
    assert h * w * 2 <= DEFAULT_IMAGE_SIZE["longest_edge"]


@pytest.mark.parametrize("args, match", [
    ((2, 1, 300), "aspect ratio"),
    ((2, 28, 28 * 201), "aspect ratio"),
    ((1, 100, 100), "temporal_factor"),
    ((2, 0, 100), "height"),
    ((2, 100, -5), "width"),
    ((2, 10.5, 100), "height"),
])
def test_smart_resize_rejects(args, match):
    with pytest.raises(ValueError, match=match):
        smart_resize(*args)


@settings(max_examples=200, deadline=None)
@given(t=st.integers(2, 40), h=st.integers(1, 5000), w=st.integers(1, 5000),
       lo=st.sampled_from([56 * 56, 12544, 100000]), hi=st.sampled_from([9633792, 11760000, 47040000, 200000]))
def test_smart_resize_matches_transformers(t, h, w, lo, hi):
    hf = _hf_module().smart_resize
    try:
        expected = hf(t, h, w, 2, 28, lo, hi)
    except ValueError:
        with pytest.raises(ValueError):
            smart_resize(t, h, w, 2, 28, lo, hi)
        return
    assert smart_resize(t, h, w, 2, 28, lo, hi) == expected


# ---------------------------------------------------------------------------------------------------------------
# parity with transformers, PIL inputs


@pytest.mark.parametrize("hw", [(375, 500), (10, 10), (20, 300), (300, 20), (28, 28), (57, 1500), (1200, 30),
                                (333, 333), (100, 5000)])
def test_parity_rgb_sizes(hf_cls, hw):
    _compare(hf_cls, [Image.fromarray(_photo(*hw))])


def test_parity_large_image_small_budget(hf_cls):
    image = Image.fromarray(_photo(700, 1000, seed=3))
    out = _compare(hf_cls, [image], size={"shortest_edge": 3136, "longest_edge": 200_000})
    assert out["image_grid_thw"][0, 1] * out["image_grid_thw"][0, 2] * 14 * 14 * 2 <= 200_000


def test_parity_min_max_pixels_aliases(hf_cls):
    image = Image.fromarray(_photo(700, 1000, seed=3))
    ours = VisionProcessor(min_pixels=3136, max_pixels=200_000)(images=image, return_tensors="np")
    hf = hf_cls(size={"shortest_edge": 3136, "longest_edge": 200_000})(images=[image], return_tensors="np")
    _assert_same(ours, hf)


def test_parity_batch_of_mixed_images(hf_cls):
    images = [Image.fromarray(_photo(h, w, seed=i)) for i, (h, w) in
              enumerate([(375, 500), (10, 10), (240, 320), (96, 480), (500, 90)])]
    ours = VisionProcessor(num_workers=3)(images=images, return_tensors="np")  # resized in parallel threads
    hf = hf_cls()(images=images, return_tensors="np")
    _assert_same(ours, hf)
    assert ours["image_grid_thw"].shape == (5, 3)
    assert ours["pixel_values"].shape[0] == int(np.prod(ours["image_grid_thw"], axis=1).sum())


def _mode_image(mode: str) -> Image.Image:
    rgb = Image.fromarray(_photo(90, 130, seed=7))
    if mode == "RGBA":  # a varying alpha channel
        return Image.fromarray(np.dstack([_photo(90, 130, 7), _photo(90, 130, 8)[..., 0]]), "RGBA")
    if mode == "LA":
        return Image.fromarray(np.dstack([_photo(90, 130, 7)[..., 0], _photo(90, 130, 8)[..., 1]]), "LA")
    if mode == "P":
        return rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    if mode == "P+transparency":
        image = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
        image.info["transparency"] = 5
        return image
    if mode == "PA":
        return rgb.convert("PA")
    if mode == "L+transparency":
        image = rgb.convert("L")
        image.info["transparency"] = 128
        return image
    if mode == "I;16":
        return Image.fromarray(_photo(90, 130, 7)[..., 0].astype(np.uint16) * 300)
    if mode == "I":
        return Image.fromarray(_photo(90, 130, 7)[..., 0].astype(np.int32) * 2 - 50)
    if mode == "F":
        return Image.fromarray(_photo(90, 130, 7)[..., 0].astype(np.float32) * 1.3)
    return rgb.convert(mode)


ALPHA_MODES = ("RGBA", "LA", "P+transparency", "L+transparency")


@pytest.mark.parametrize("mode", [pytest.param(m, marks=needs_rgb_conversion) if m in ALPHA_MODES else m
                                  for m in ["RGB", "RGBA", "LA", "L", "P", "P+transparency", "PA", "L+transparency",
                                            "CMYK", "I;16", "I", "F", "1", "YCbCr", "HSV"]])
def test_parity_pil_modes(hf_cls, mode):
    image = _mode_image(mode)
    _compare(hf_cls, [image])


def test_alpha_is_composited_onto_white():
    rgba = np.zeros((56, 56, 4), np.uint8)  # fully transparent black
    out = VisionProcessor(do_normalize=False)(images=Image.fromarray(rgba, "RGBA"), return_tensors="np")
    np.testing.assert_allclose(out["pixel_values"], 1.0)


def test_example_images_parity(hf_cls):
    paths = sorted(EXAMPLES.iterdir())
    assert len(paths) >= 3
    ours = VisionProcessor()(images=[str(p) for p in paths], return_tensors="np")
    hf = hf_cls()(images=[str(p) for p in paths], return_tensors="np")  # paths: loaded by load_image there too
    _assert_same(ours, hf)
    for path in paths:
        assert path.stat().st_size < 60_000


# ---------------------------------------------------------------------------------------------------------------
# parity, numpy / torch / path inputs


def test_parity_numpy_uint8(hf_cls):
    _compare(hf_cls, [_photo(120, 90, 1), _photo(50, 300, 2)])


@needs_rgb_conversion
def test_parity_numpy_rgba_uint8(hf_cls):
    _compare(hf_cls, [_photo(120, 90, 1, channels=4)])


@needs_rgb_conversion
def test_parity_numpy_single_channel(hf_cls):
    gray = _photo(120, 90, 1)[..., :1]
    _compare(hf_cls, [gray])
    # HW (no channel axis) is accepted here (transformers rejects it) and equals HW1.
    ours2d = VisionProcessor()(images=gray[..., 0], return_tensors="np")
    ours3d = VisionProcessor()(images=gray, return_tensors="np")
    np.testing.assert_array_equal(ours2d["pixel_values"], ours3d["pixel_values"])


def test_parity_numpy_chw(hf_cls):
    _compare(hf_cls, [np.ascontiguousarray(_photo(64, 96, 4).transpose(2, 0, 1))])


def test_parity_torch_chw(hf_cls):
    chw = torch.from_numpy(_photo(70, 110, 5)).permute(2, 0, 1).contiguous()
    _compare(hf_cls, [chw])
    out = VisionProcessor()(images=chw, return_tensors="pt")
    assert out["pixel_values"].dtype == torch.float32 and out["image_grid_thw"].dtype == torch.int64


@pytest.mark.parametrize("channels", [3, pytest.param(4, marks=needs_rgb_conversion)])
def test_float_inputs_equal_transformers_without_rescale(hf_cls, channels):
    """Float [0, 1] inputs: transformers rescales them twice by default; ours equals its do_rescale=False output."""
    u8 = _photo(80, 100, 6, channels=channels)
    floats = u8.astype(np.float32) / 255
    floats[0, 0, 0] = 0.5004  # a value that is not a multiple of 1/255
    ours = VisionProcessor()(images=[floats], return_tensors="np")
    hf = hf_cls()(images=[floats], do_rescale=False, return_tensors="np")
    _assert_same(ours, hf)
    ours_t = VisionProcessor()(images=[torch.from_numpy(floats).permute(2, 0, 1)], return_tensors="np")
    np.testing.assert_array_equal(ours_t["pixel_values"], ours["pixel_values"])
    if channels == 3:  # an exact a/255 float image equals the uint8 image
        exact = VisionProcessor()(images=[u8.astype(np.float64) / 255], return_tensors="np")
        np.testing.assert_array_equal(exact["pixel_values"], VisionProcessor()(images=[u8], return_tensors="np")
                                      ["pixel_values"])


def test_path_inputs(tmp_path, hf_cls):
    array = _photo(77, 130, 9)
    png = tmp_path / "a.png"
    Image.fromarray(array).save(png)
    out_str = VisionProcessor()(images=str(png), return_tensors="np")
    out_path = VisionProcessor()(images=png, return_tensors="np")
    np.testing.assert_array_equal(out_str["pixel_values"], out_path["pixel_values"])
    _assert_same(out_str, hf_cls()(images=[array], return_tensors="np"))


@pytest.mark.parametrize("kwargs", [
    {"do_normalize": False},
    {"do_rescale": False},
    {"do_rescale": False, "do_normalize": False},
    {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
    {"rescale_factor": 1 / 127.5},
    {"resample": 2},
])
def test_parity_options(hf_cls, kwargs):
    _compare(hf_cls, [Image.fromarray(_photo(90, 150, 11))], **kwargs)


def test_do_resize_false(hf_cls):
    image = Image.fromarray(_photo(112, 168, 12))
    _compare(hf_cls, [image], do_resize=False)
    with pytest.raises(ValueError, match="multiples"):
        VisionProcessor(do_resize=False)(images=Image.fromarray(_photo(100, 168, 12)))


def test_return_types_and_batch_array():
    batch = np.stack([_photo(112, 168, i) for i in range(3)])
    pt = VisionProcessor()(images=batch)
    assert isinstance(pt["pixel_values"], torch.Tensor) and pt["pixel_values"].shape == (3 * 8 * 12, 1176)
    assert pt["image_grid_thw"].tolist() == [[1, 8, 12]] * 3
    np_out = VisionProcessor()(images=list(batch), return_tensors="np")
    np.testing.assert_array_equal(pt["pixel_values"].numpy(), np_out["pixel_values"])
    assert "pixel_values_videos" not in pt


# ---------------------------------------------------------------------------------------------------------------
# get_number_of_image_patches


@pytest.mark.parametrize("hw", [(375, 500), (10, 10), (20, 300), (4000, 6000), (3000, 3000), (1, 150)])
def test_number_of_patches_matches_transformers(hf_cls, hw):
    ours, hf = VisionProcessor(), hf_cls()
    assert ours.get_number_of_image_patches(*hw) == hf.get_number_of_image_patches(*hw)
    kwargs = {"size": RELEASED}
    assert ours.get_number_of_image_patches(*hw, kwargs) == hf.get_number_of_image_patches(*hw, kwargs)


def test_number_of_patches_matches_output():
    proc = VisionProcessor()
    out = proc(images=_photo(211, 97, 2), return_tensors="np")
    assert proc.get_number_of_image_patches(211, 97) == out["pixel_values"].shape[0]


# ---------------------------------------------------------------------------------------------------------------
# torch backend


def test_torch_backend_close_to_pil():
    images = [Image.open(p) for p in sorted(EXAMPLES.iterdir())] + [Image.fromarray(_photo(375, 500, 4))]
    pil = VisionProcessor()(images=images, return_tensors="np")
    tch = VisionProcessor(backend="torch", device="cpu")(images=images, return_tensors="np")
    np.testing.assert_array_equal(pil["image_grid_thw"], tch["image_grid_thw"])
    diff = np.abs(pil["pixel_values"] - tch["pixel_values"])
    # Normalized units: one uint8 level is about 1/(255*0.27) = 0.015.
    assert diff.mean() < 0.02, diff.mean()
    assert np.quantile(diff, 0.99) < 0.1


def test_torch_backend_default_with_device():
    assert VisionProcessor(device="cpu").backend == "torch"
    assert VisionProcessor().backend == "pil"
    with pytest.raises(ValueError, match="backend"):
        VisionProcessor(backend="cv2")
    with pytest.raises(ValueError, match="torch"):
        VisionProcessor(backend="pil", device="cuda")


@pytest.mark.gpu
def test_torch_backend_cuda():
    images = [Image.fromarray(_photo(375, 500, 4))]
    out = VisionProcessor(device="cuda")(images=images)
    assert out["pixel_values"].is_cuda
    pil = VisionProcessor()(images=images)
    assert (out["pixel_values"].cpu() - pil["pixel_values"]).abs().mean() < 0.02


# ---------------------------------------------------------------------------------------------------------------
# from_pretrained / save_pretrained


def test_from_pretrained_reads_configs(tmp_path, hf_cls):
    image_config = {"image_processor_type": "Glm4vImageProcessor", "size": RELEASED, "do_resize": True,
                    "resample": 3, "image_mean": [0.48145466, 0.4578275, 0.40821073], "patch_size": 14,
                    "merge_size": 2, "temporal_patch_size": 2, "some_unknown_key": {"x": 1}}
    video_config = {"video_processor_type": "Glm4vVideoProcessor", "size": {"shortest_edge": 3136,
                    "longest_edge": 1_000_000}, "fps": 1, "max_duration": 120, "num_frames": 16}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(image_config))
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(video_config))
    proc = VisionProcessor.from_pretrained(tmp_path)
    assert proc.size == RELEASED and proc.video_size == video_config["size"]
    assert proc.fps == 1.0 and proc.max_duration == 120
    image = Image.fromarray(_photo(4000 // 4, 6000 // 4, 1))
    _assert_same(proc(images=image, return_tensors="np"), hf_cls(size=RELEASED)(images=[image], return_tensors="np"))
    # a path to the JSON file itself works too
    assert VisionProcessor.from_pretrained(tmp_path / "preprocessor_config.json").size == RELEASED
    assert gf.VisionProcessor.from_pretrained(str(tmp_path), fps=3).fps == 3.0


def test_from_pretrained_min_max_pixels_keys(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 3136, "max_pixels": 400000}))
    proc = VisionProcessor.from_pretrained(tmp_path)
    assert proc.size == {"shortest_edge": 3136, "longest_edge": 400000}
    assert proc.video_size == {"shortest_edge": 12544, "longest_edge": 47040000}


def test_from_pretrained_nested_processor_config(tmp_path):
    nested = {"image_processor": {"size": RELEASED}, "video_processor": {"fps": 4}}
    (tmp_path / "processor_config.json").write_text(json.dumps(nested))
    proc = VisionProcessor.from_pretrained(tmp_path)
    assert proc.size == RELEASED and proc.fps == 4.0


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        VisionProcessor.from_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        VisionProcessor.from_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        VisionProcessor.from_pretrained(tmp_path)
    for bad in ({"size": {"shortest_edge": -1, "longest_edge": 10}}, {"size": {"height": 224, "width": 224}},
                {"image_std": [0.1, 0.0, 0.1]}, {"patch_size": "14"}, {"resample": 17}, {"do_rescale": "yes"},
                {"size": {"shortest_edge": 100, "longest_edge": 10}}, {"rescale_factor": float("nan")}, [1, 2]):
        (tmp_path / "preprocessor_config.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError):
            VisionProcessor.from_pretrained(tmp_path)


def test_save_pretrained_round_trip(tmp_path, hf_cls):
    proc = VisionProcessor(size=RELEASED, fps=1.5, video_size={"shortest_edge": 3136, "longest_edge": 500000})
    proc.save_pretrained(tmp_path)
    again = VisionProcessor.from_pretrained(tmp_path)
    assert again.to_dict() == proc.to_dict() and again.video_to_dict() == proc.video_to_dict()
    # transformers reads what we write
    hf = hf_cls.from_pretrained(tmp_path)
    image = Image.fromarray(_photo(300, 200, 2))
    _assert_same(again(images=image, return_tensors="np"), hf(images=[image], return_tensors="np"))


# ---------------------------------------------------------------------------------------------------------------
# bad input


def _png_bytes(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files(tmp_path, fmt):
    data = _png_bytes(_photo(200, 300, 1), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut"):
        VisionProcessor()(images=path)


def test_corrupt_and_non_image_files(tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="junk.png"):
        VisionProcessor()(images=junk)
    text = tmp_path / "notes.jpg"
    text.write_text("hello")
    with pytest.raises(ValueError, match="notes.jpg"):
        VisionProcessor()(images=str(text))
    with pytest.raises(ValueError, match="directory"):
        VisionProcessor()(images=tmp_path)


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="nope.png"):
        VisionProcessor()(images="/definitely/not/here/nope.png")


def test_lazily_opened_truncated_pil_image(tmp_path):
    data = _png_bytes(_photo(200, 300, 1))
    image = Image.open(io.BytesIO(data[: len(data) // 2]))  # header is fine, pixel data is not
    with pytest.raises(ValueError, match="truncated"):
        VisionProcessor()(images=image)


def test_decompression_bomb_limit(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.fromarray(_photo(100, 120, 1)).save(path)
    proc = VisionProcessor(max_image_pixels=5000)
    assert proc.max_image_pixels == 5000
    for item in (path, Image.open(path), _photo(100, 120, 1), torch.zeros(3, 100, 120)):
        with pytest.raises(ValueError, match="max_image_pixels"):
            proc(images=item)
    VisionProcessor(max_image_pixels=None)(images=path)  # no limit
    assert VisionProcessor().max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS
    # PIL's own DecompressionBombError (raised while opening) also becomes a ValueError.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ValueError, match="decompression bomb"):
        load_image(path, max_image_pixels=1500)
    # A limit above PIL's lifts PIL's check for our open only.
    assert load_image(path, max_image_pixels=50_000).size == (120, 100)
    assert Image.MAX_IMAGE_PIXELS == 1000


@pytest.mark.parametrize("bad, match", [
    (np.zeros((0, 10, 3), np.uint8), "empty"),
    (np.zeros((10, 0), np.uint8), "empty"),
    (np.zeros((10, 10, 2), np.uint8), "channel"),
    (np.zeros((10, 10, 5), np.uint8), "channel"),
    (np.zeros((2, 10, 10, 5, 1), np.uint8), "dimensions"),
    (np.full((30, 30, 3), np.nan, np.float32), "NaN"),
    (np.full((30, 30, 3), np.inf, np.float64), "NaN or infinite"),
    (np.full((30, 30, 3), 1.5, np.float32), r"\[0, 1\]"),
    (np.full((30, 30, 3), -0.1, np.float32), r"\[0, 1\]"),
    (np.full((30, 30, 3), 300, np.int32), "0..255"),
    (np.zeros((30, 30, 3), bool), "bool"),
    (np.zeros((30, 30, 3), np.complex64), "dtype"),
    (np.zeros((1, 300), np.uint8), "aspect ratio"),
    (torch.zeros(3, 0, 5), "empty"),
    (torch.full((3, 30, 30), float("nan")), "NaN"),
    (42, "unsupported type"),
    ({"a": 1}, "unsupported type"),
    (b"\x89PNG", "cannot identify image 0"),           # encoded bytes, truncated
    ([], "empty"),
    (np.zeros((0, 30, 30, 3), np.uint8), "empty"),
])
def test_bad_inputs_raise_value_error(bad, match):
    with pytest.raises(ValueError, match=match):
        VisionProcessor()(images=bad)


def test_bad_item_in_batch_is_named():
    with pytest.raises(ValueError, match="image 1"):
        VisionProcessor()(images=[_photo(30, 30), np.zeros((10, 10, 2), np.uint8)])


def test_aspect_ratio_error_names_the_input_and_its_size(tmp_path):
    """The message gives the input's position, its path and the size it was given at, not the upscaled one."""
    Image.fromarray(np.zeros((2, 600, 3), np.uint8)).save(tmp_path / "strip.png")
    with pytest.raises(ValueError, match=r"image 1 \('.*strip\.png'\): aspect ratio must be at most 200, got "
                                         r"300 for a 600x2 \(width x height\) input"):
        VisionProcessor()(images=[_photo(30, 30), str(tmp_path / "strip.png")])
    with pytest.raises(ValueError, match=r"for a 300x1 \(width x height\) input"):
        smart_resize(2, 1, 300)
    for backend in ("pil", "torch"):
        with pytest.raises(ValueError, match=r"^image 0: aspect ratio"):
            VisionProcessor(backend=backend)(images=np.zeros((1, 300), np.uint8))


def test_aspect_ratio_of_a_file_refused_before_decoding(tmp_path, monkeypatch):
    """Files and bytes: the ratio comes from the header, so a costly decode is never spent on a refused image."""
    Image.fromarray(np.zeros((2, 600, 3), np.uint8)).save(tmp_path / "strip.png")
    decoded = []
    real = Image.Image.load

    def load(image):          # PIL's decode of an opened file or bytes, counted once per image
        if getattr(image, "fp", None) is not None and not hasattr(image, "decoded_by_test"):
            image.decoded_by_test = True
            decoded.append(image.size)
        return real(image)

    monkeypatch.setattr(Image.Image, "load", load)
    for source in (str(tmp_path / "strip.png"), (tmp_path / "strip.png").read_bytes()):
        with pytest.raises(ValueError, match=r"^image 0.*aspect ratio must be at most 200"):
            VisionProcessor()(images=[source])
    assert decoded == []
    # A file that passes is decoded once, and gives what loading it first gives.
    Image.fromarray(_photo(40, 60)).save(tmp_path / "ok.png")
    from_file = VisionProcessor()(images=[str(tmp_path / "ok.png")])
    assert len(decoded) == 1
    loaded = VisionProcessor()(images=[Image.open(tmp_path / "ok.png").convert("RGB")])
    assert torch.equal(from_file["pixel_values"], loaded["pixel_values"])


def test_pixel_limit_error_says_how_to_raise_it():
    with pytest.raises(ValueError, match=r"max_image_pixels=100\b.*--max-image-pixels"):
        VisionProcessor(max_image_pixels=100)(images=_photo(30, 30))


def test_call_argument_errors():
    with pytest.raises(ValueError, match="images"):
        VisionProcessor()()
    with pytest.raises(ValueError, match="return_tensors"):
        VisionProcessor()(images=_photo(30, 30), return_tensors="tf")


def test_do_convert_rgb_false_requires_rgb():
    proc = VisionProcessor(do_convert_rgb=False)
    out = proc(images=_photo(112, 112), return_tensors="np")
    assert out["pixel_values"].shape == (64, 1176)
    with pytest.raises(ValueError, match="do_convert_rgb"):
        proc(images=Image.fromarray(_photo(56, 56)).convert("L"))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=st.lists(st.integers(0, 40), min_size=0, max_size=4),
       dtype=st.sampled_from([np.uint8, np.uint16, np.int64, np.float32, np.float64, np.bool_]),
       scale=st.sampled_from([0.0, 1.0, 255.0, 1000.0, -1.0]))
def test_fuzz_arrays_never_crash(shape, dtype, scale):
    """Any array either processes into consistent shapes or raises ValueError, never something else."""
    rng = np.random.default_rng(len(shape))
    array = (rng.random(shape) * scale).astype(dtype)
    try:
        out = VisionProcessor()(images=array, return_tensors="np")
    except ValueError:
        return
    grid = out["image_grid_thw"]
    assert out["pixel_values"].shape == (int(np.prod(grid, axis=1).sum()), 1176)
    assert np.isfinite(out["pixel_values"]).all()
    assert math.isfinite(float(out["pixel_values"].sum()))


def test_single_encoded_image_bytes():
    """Encoded bytes are an image input on their own, not only inside a list."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    proc = gf.VisionProcessor()
    single, listed = proc(images=buf.getvalue()), proc(images=[buf.getvalue()])
    assert single["image_grid_thw"].tolist() == listed["image_grid_thw"].tolist() == [[1, 6, 8]]
    assert torch.equal(single["pixel_values"], listed["pixel_values"])


def test_urls_are_not_fetched_by_the_offline_api():
    """The processor and the pipeline say a URL is not downloaded (as the server does), not "file not found"."""
    from _tiny import tiny_config

    url = "https://example.com/x.jpg"
    with pytest.raises(ValueError, match=r"'https://example.com/x.jpg' is a URL: glm4v-fast does not fetch URLs"):
        VisionProcessor()(images=[url])
    model = gf.VisionModel(tiny_config())
    pipe = gf.GLM4VEmbeddingPipeline(model=model, processor=VisionProcessor())
    with pytest.raises(ValueError, match="does not fetch URLs"):
        pipe.extract_image_embeddings([url])
    (result,) = pipe.iter_image_embeddings([url], skip_bad=True)
    assert result.embedding is None and "does not fetch URLs" in result.error


def test_image_inputs_number_images_from_first_index():
    good = _photo(40, 60)
    out = VisionProcessor().image_inputs([good, good], first_index=5)
    assert torch.equal(out["pixel_values"], VisionProcessor()(images=[good, good])["pixel_values"])
    with pytest.raises(ValueError, match=r"^image 6: aspect ratio"):
        VisionProcessor().image_inputs([good, np.zeros((1, 300), np.uint8)], first_index=5)


def test_image_inputs_call_images_by_their_names():
    good, thin = _photo(40, 60), np.zeros((1, 300), np.uint8)
    with pytest.raises(ValueError, match=r"^thin strip: aspect ratio"):
        VisionProcessor().image_inputs([good, thin], first_index=5, names=["photo", "thin strip"])
    with pytest.raises(ValueError, match="got 2 images but 1 names"):
        VisionProcessor().image_inputs([good, good], names=["photo"])
