"""Image preprocessing: parity with transformers' image processors (both backends), smart_resize, config I/O, bad
input.

Every parity test runs once per backend: ``pil`` against ``Glm4vImageProcessorPil``, and ``torchvision`` (the
default) against ``Glm4vImageProcessor``, transformers' default, which needs torchvision. Where torchvision is
missing (the core test environment) the torchvision cases skip; ``make test-torchvision`` runs them.
"""
from __future__ import annotations

import importlib
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


def _torchvision_installed() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # missing, or a build that does not load with this torch
        return False
    return True


needs_torchvision = pytest.mark.skipif(
    not _torchvision_installed(),
    reason="torchvision is not installed here, so transformers' default image processor (Glm4vImageProcessor, the "
           "oracle of backend='torchvision') cannot run; `make test-torchvision` runs these comparisons")

#: Our backend, its transformers class (module, name).
HF_CLASSES = {"pil": ("image_processing_pil_glm4v", "Glm4vImageProcessorPil"),
              "torchvision": ("image_processing_glm4v", "Glm4vImageProcessor")}
BACKEND_PARAMS = ["pil", pytest.param("torchvision", marks=needs_torchvision)]


def _hf_class(backend: str):
    pytest.importorskip("transformers")
    module, name = HF_CLASSES[backend]
    return getattr(importlib.import_module(f"transformers.models.glm4v.{module}"), name)


@pytest.fixture(scope="module", params=BACKEND_PARAMS)
def hf_cls(request):
    """transformers' image processor of one backend; ``_backend(hf_cls)`` names ours."""
    return _hf_class(request.param)


def _backend(hf_cls) -> str:
    return "pil" if hf_cls.__name__.endswith("Pil") else "torchvision"


def _ours(hf_cls, **kwargs) -> VisionProcessor:
    """Our processor with the backend of ``hf_cls``."""
    return VisionProcessor(backend=_backend(hf_cls), **kwargs)


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
    ours = _ours(hf_cls, **kwargs)(images=images, return_tensors="np")
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
    pytest.importorskip("transformers")
    hf = importlib.import_module("transformers.models.glm4v.image_processing_pil_glm4v").smart_resize
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
    ours = _ours(hf_cls, min_pixels=3136, max_pixels=200_000)(images=image, return_tensors="np")
    hf = hf_cls(size={"shortest_edge": 3136, "longest_edge": 200_000})(images=[image], return_tensors="np")
    _assert_same(ours, hf)


def test_parity_batch_of_mixed_images(hf_cls):
    images = [Image.fromarray(_photo(h, w, seed=i)) for i, (h, w) in
              enumerate([(375, 500), (10, 10), (240, 320), (96, 480), (500, 90)])]
    ours = _ours(hf_cls, num_workers=3)(images=images, return_tensors="np")  # resized in parallel threads
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


@pytest.mark.parametrize("backend", ["pil", "torchvision"])
def test_alpha_is_composited_onto_white(backend):
    rgba = np.zeros((56, 56, 4), np.uint8)  # fully transparent black
    for image in (Image.fromarray(rgba, "RGBA"), rgba):
        out = VisionProcessor(do_normalize=False, backend=backend)(images=image, return_tensors="np")
        np.testing.assert_allclose(out["pixel_values"], 1.0)


def test_example_images_parity(hf_cls):
    paths = sorted(EXAMPLES.iterdir())
    assert len(paths) >= 3
    ours = _ours(hf_cls)(images=[str(p) for p in paths], return_tensors="np")
    # Files are decoded by PIL, as transformers' load_image (and vLLM, and the server) do.
    hf = hf_cls()(images=[load_image(str(p)) for p in paths], return_tensors="np")
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
def test_float_inputs_equal_transformers_without_rescale(channels):
    """Float [0, 1] inputs: transformers rescales them twice by default; ours equals its do_rescale=False output
    (of the PIL backend, which quantises them to uint8 as we do; the torchvision one resizes the floats)."""
    hf_cls = _hf_class("pil")
    u8 = _photo(80, 100, 6, channels=channels)
    floats = u8.astype(np.float32) / 255
    floats[0, 0, 0] = 0.5004  # a value that is not a multiple of 1/255
    ours = VisionProcessor(backend="pil")(images=[floats], return_tensors="np")
    hf = hf_cls()(images=[floats], do_rescale=False, return_tensors="np")
    _assert_same(ours, hf)
    ours_t = VisionProcessor(backend="pil")(images=[torch.from_numpy(floats).permute(2, 0, 1)], return_tensors="np")
    np.testing.assert_array_equal(ours_t["pixel_values"], ours["pixel_values"])
    if channels == 3:  # an exact a/255 float image equals the uint8 image
        exact = VisionProcessor(backend="pil")(images=[u8.astype(np.float64) / 255], return_tensors="np")
        np.testing.assert_array_equal(exact["pixel_values"], VisionProcessor(backend="pil")(images=[u8], return_tensors="np")
                                      ["pixel_values"])


def test_path_inputs(tmp_path, hf_cls):
    array = _photo(77, 130, 9)
    png = tmp_path / "a.png"
    Image.fromarray(array).save(png)
    out_str = _ours(hf_cls)(images=str(png), return_tensors="np")
    out_path = _ours(hf_cls)(images=png, return_tensors="np")
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
        _ours(hf_cls, do_resize=False)(images=Image.fromarray(_photo(100, 168, 12)))


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
# realistic photos: natural-looking content, JPEG round trips, odd sizes, EXIF orientation, 16-bit files


def _natural_photo(h: int, w: int, seed: int) -> Image.Image:
    """A JPEG-compressed picture with what photos have: smooth shading, blurred and sharp object edges, texture,
    sensor noise and JPEG's blocks and chroma subsampling."""
    from PIL import ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    sky = np.stack([120 + 80 * np.cos(3 * yy + rng.uniform(0, 6)), 140 + 60 * yy, 200 - 90 * yy + 20 * xx], -1)
    image = Image.fromarray(sky.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = rng.uniform(-0.2, 1.0, 2) * (w, h)
        x1, y1 = x0 + rng.uniform(0.05, 0.6) * w, y0 + rng.uniform(0.05, 0.6) * h
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 2.5))))
    array = np.asarray(image).astype(np.float64) + rng.normal(0, 4, (h, w, 3))
    array[: h // 3, : w // 2] += 25 * np.sin(np.arange(w // 2) / 1.7)[None, :, None]  # fine texture
    buf = io.BytesIO()
    Image.fromarray(array.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=int(rng.integers(70, 95)))
    return Image.open(io.BytesIO(buf.getvalue()))


#: Sizes that need resizing (odd, prime, extreme aspect ratios, under the minimum, large) and one that does not.
PHOTO_SIZES = [(200, 300), (300, 200), (479, 641), (1080, 1920), (2448, 3264), (997, 13), (31, 2900), (60, 40),
               (1001, 1001), (224, 336)]


@pytest.mark.parametrize("hw", PHOTO_SIZES)
def test_parity_realistic_photos(hf_cls, hw):
    _compare(hf_cls, [_natural_photo(*hw, seed=sum(hw))])


@needs_rgb_conversion  # the palette PNG's transparency
def test_parity_realistic_photo_files_with_exif_orientation(tmp_path, hf_cls):
    """Files as users have them: JPEGs whose EXIF orientation turns them, a 16-bit greyscale PNG, a palette PNG
    with transparency, a CMYK JPEG. Ours reads the paths; transformers gets them from its load_image."""
    paths = []
    for orientation in (1, 3, 6, 8):
        photo = _natural_photo(200 + orientation, 300 - orientation, seed=orientation)
        exif = Image.Exif()
        exif[0x0112] = orientation
        path = tmp_path / f"oriented_{orientation}.jpg"
        photo.save(path, "JPEG", exif=exif.tobytes(), quality=90)
        paths.append(path)
    Image.fromarray((_photo(150, 233, 3)[..., 0].astype(np.uint16) * 257)).save(tmp_path / "grey16.png")
    palette = _natural_photo(170, 190, 4).convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    palette.save(tmp_path / "palette.png", transparency=3)
    _natural_photo(130, 170, 5).convert("CMYK").save(tmp_path / "cmyk.jpg", "JPEG", quality=92)
    paths += [tmp_path / "grey16.png", tmp_path / "palette.png", tmp_path / "cmyk.jpg"]
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"
    ours = _ours(hf_cls)(images=[str(p) for p in paths], return_tensors="np")
    hf = hf_cls()(images=[load_image(str(p)) for p in paths], return_tensors="np")
    _assert_same(ours, hf)
    assert ours["image_grid_thw"][1].tolist() == [1, 14, 22]  # orientation 3 keeps the sides, 6 swaps them
    assert ours["image_grid_thw"][2].tolist() == [1, 20, 14]


# ---------------------------------------------------------------------------------------------------------------
# the torchvision backend with torch alone


def _tensor_path(image, proc: VisionProcessor) -> np.ndarray:
    """transformers' torchvision path written out with torch: uint8 CHW → resize → fused normalize → patchify."""
    from glm4v_fast.transforms import normalize_fused, patchify, resize_uint8

    rgb = load_image(image) if isinstance(image, (str, Path)) else image
    rgb = np.array(rgb.convert("RGB")) if isinstance(rgb, Image.Image) else rgb
    x = torch.from_numpy(rgb).permute(2, 0, 1).contiguous()[None]
    h, w = proc.resized_size(*rgb.shape[:2])
    x = normalize_fused(resize_uint8(x, h, w), True, 1 / 255, True, proc.image_mean, proc.image_std)
    return patchify(x)[0].numpy()


def test_torchvision_backend_equals_the_tensor_path():
    """The default backend (a torch uint8 resize and a table for the fused normalize, gathered in patch order)
    equals the straightforward torch ops of transformers' torchvision path, bit for bit, without torchvision."""
    images = [_natural_photo(*hw, seed=i) for i, hw in enumerate(PHOTO_SIZES)] + [_photo(77, 1201, 9)]
    proc = VisionProcessor(num_workers=2)
    out = proc(images=images, return_tensors="np")
    expected = np.concatenate([_tensor_path(image, proc) for image in images])
    np.testing.assert_array_equal(out["pixel_values"], expected)


def test_resize_does_not_depend_on_memory_layout():
    """torchvision resizes a contiguous CHW tensor; the processor hands torch a channels-last view of the HWC array
    (no copy). torch's uint8 kernel gives the same bytes for both."""
    from glm4v_fast.transforms import resize_uint8

    for h, w, size in [(200, 300, (196, 308)), (997, 13, (868, 28)), (1080, 1920, (1092, 1932))]:
        hwc = np.asarray(_natural_photo(h, w, seed=h).convert("RGB")).copy()
        channels_last = torch.from_numpy(hwc).permute(2, 0, 1)[None]
        assert torch.equal(resize_uint8(channels_last, *size), resize_uint8(channels_last.contiguous(), *size))


def test_torchvision_value_table_is_the_fused_normalize():
    from glm4v_fast.processing.values import torchvision_value_table
    from glm4v_fast.transforms import normalize_fused

    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    table = torchvision_value_table(True, 1 / 255, True, mean, std)
    values = torch.arange(256, dtype=torch.uint8).repeat(3, 1)[None, :, :, None]
    np.testing.assert_array_equal(table, normalize_fused(values, True, 1 / 255, True, mean, std)[0, :, :, 0].numpy())
    # transformers' fused constants: mean and std times 1/rescale_factor, in float32
    fused_mean = torch.tensor(mean) * (1.0 / (1 / 255))
    assert table[0, 0] == np.float32((torch.tensor(0.0) - fused_mean[0]) / (torch.tensor(std) * 255.0)[0])


def test_pil_and_torchvision_backends_differ_slightly():
    """The two transformers backends resample differently; each of ours follows its own. Normalized units: one
    uint8 level is about 1/(255*0.27) = 0.015."""
    images = [Image.open(p) for p in sorted(EXAMPLES.iterdir())] + [Image.fromarray(_photo(375, 500, 4))]
    pil = VisionProcessor(backend="pil")(images=images, return_tensors="np")
    tch = VisionProcessor(backend="torchvision")(images=images, return_tensors="np")
    np.testing.assert_array_equal(pil["image_grid_thw"], tch["image_grid_thw"])
    diff = np.abs(pil["pixel_values"] - tch["pixel_values"])
    assert 0 < diff.mean() < 0.02, diff.mean()
    assert np.quantile(diff, 0.99) < 0.1


def test_backend_names_and_default():
    assert VisionProcessor().backend == "torchvision"          # transformers' default
    assert VisionProcessor(backend="torch").backend == "torchvision"  # the older name
    assert VisionProcessor(device="cpu").backend == "torchvision"
    assert VisionProcessor(backend="pil").backend == "pil"
    with pytest.raises(ValueError, match="backend"):
        VisionProcessor(backend="cv2")
    with pytest.raises(ValueError, match="torchvision"):
        VisionProcessor(backend="pil", device="cuda")
    with pytest.raises(ValueError, match="backend='pil'"):
        VisionProcessor(resample="lanczos")                   # torchvision's tensor resize has no Lanczos here
    assert VisionProcessor(resample="lanczos", backend="pil").resample == 1


def test_worker_threads_leave_torch_threads_alone():
    """Resizes in the processor's worker threads run single-threaded inside torch; the caller's setting stays."""
    before = torch.get_num_threads()
    VisionProcessor(num_workers=2)(images=[_photo(300, 200, 1), _photo(200, 300, 2)])
    assert torch.get_num_threads() == before


@pytest.mark.gpu
def test_torchvision_backend_cuda():
    images = [Image.fromarray(_photo(375, 500, 4))]
    out = VisionProcessor(device="cuda")(images=images)
    assert out["pixel_values"].is_cuda
    cpu = VisionProcessor()(images=images)
    assert (out["pixel_values"].cpu() - cpu["pixel_values"]).abs().mean() < 0.02


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
    proc = VisionProcessor.from_pretrained(tmp_path, backend=_backend(hf_cls))
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
    assert proc.backend == "torchvision"  # a config without ours: transformers' default
    assert proc.size == {"shortest_edge": 3136, "longest_edge": 400000}
    assert proc.video_size == {"shortest_edge": 12544, "longest_edge": 47040000}


def test_from_pretrained_nested_processor_config(tmp_path):
    nested = {"image_processor": {"size": RELEASED}, "video_processor": {"fps": 4}}
    (tmp_path / "processor_config.json").write_text(json.dumps(nested))
    proc = VisionProcessor.from_pretrained(tmp_path)
    assert proc.size == RELEASED and proc.fps == 4.0


def test_from_pretrained_video_options_nested_beside_an_image_config(tmp_path):
    """transformers 4's preprocessor_config.json beside transformers 5's processor_config.json (as checkpoints
    written by both have): the video options come from the nested file."""
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": RELEASED}))
    nested = {"image_processor": {"size": RELEASED}, "video_processor": {"size": {"shortest_edge": 784,
                                                                                   "longest_edge": 50176}}}
    (tmp_path / "processor_config.json").write_text(json.dumps(nested))
    proc = VisionProcessor.from_pretrained(tmp_path)
    assert proc.size == RELEASED and proc.video_size == {"shortest_edge": 784, "longest_edge": 50176}


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
    proc = _ours(hf_cls, size=RELEASED, fps=1.5, video_size={"shortest_edge": 3136, "longest_edge": 500000})
    proc.save_pretrained(tmp_path)
    again = VisionProcessor.from_pretrained(tmp_path)
    assert again.to_dict() == proc.to_dict() and again.video_to_dict() == proc.video_to_dict()
    assert again.backend == proc.backend == _backend(hf_cls)  # the backend round-trips
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


@pytest.mark.parametrize("header, kind", [(b"\xff\xd8\xff\xe0", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"),
                                          (b"GIF89a", "GIF")])
def test_garbage_after_a_format_header_is_named(tmp_path, header, kind):
    """PIL's own words for these ("Truncated File Read", ...) do not tell a user what is wrong with the file."""
    path = tmp_path / "fake.img"
    path.write_bytes(header + b"not really an image")
    for source in (path, path.read_bytes()):
        with pytest.raises(ValueError, match=f"starts like a {kind} file but is truncated or not a valid {kind}"):
            VisionProcessor()(images=source)


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
    for backend in ("pil", "torchvision"):
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
