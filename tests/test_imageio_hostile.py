"""The image loaders under hostile files: bombs refused from the header, costly JPEGs refused before
decoding, every decoder failure a ValueError, and EXIF orientation applied like transformers' `load_image`.

Every file is made in the test: a GIF declaring a huge screen, a progressive JPEG repeating one scan hundreds of
times, corrupt AVIF and BLP files, an EXIF-rotated JPEG, and a few hundred mutated images of several formats.
"""
from __future__ import annotations

import base64
import io
import random

import numpy as np
import pytest
from PIL import Image, features

import glm4v_fast as gf
from glm4v_fast import imageio


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255.0 / max(w - 1, 1), yy * 255.0 / max(h - 1, 1), (xx * yy) % 251], -1)
    return (base + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def huge_screen_gif(width: int, height: int) -> bytes:
    """A 1x1 GIF whose header declares a width x height logical screen (PIL allocates the whole screen)."""
    data = bytearray(_encode(Image.new("P", (1, 1)), "GIF"))
    data[6:10] = width.to_bytes(2, "little") + height.to_bytes(2, "little")
    return bytes(data)


def many_scan_jpeg(scans: int) -> bytes:
    """A progressive JPEG whose last scan is repeated until it has `scans` scans: a small file that decodes once
    per scan (libjpeg accepts the repeated refinement scans with a warning)."""
    data = _encode(Image.fromarray(_photo(64, 96)), "JPEG", progressive=True, quality=90)
    last_sos = data.rindex(b"\xff\xda")
    end = data.rindex(b"\xff\xd9")
    count = imageio.count_jpeg_scans(data)
    return data[:end] + data[last_sos:end] * (scans - count) + data[end:]


def test_count_jpeg_scans():
    photo = Image.fromarray(_photo(40, 56))
    assert imageio.count_jpeg_scans(_encode(photo, "JPEG")) == 1
    progressive = imageio.count_jpeg_scans(_encode(photo, "JPEG", progressive=True))
    assert 2 < progressive < 20
    assert imageio.count_jpeg_scans(many_scan_jpeg(300)) == 300
    assert imageio.count_jpeg_scans(many_scan_jpeg(300), stop_after=50) == 51  # stops early


def test_many_scan_jpeg_refused_before_decoding(tmp_path, monkeypatch):
    data = many_scan_jpeg(300)
    path = tmp_path / "scans.jpg"
    path.write_bytes(data)
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self) or None, raising=True)
    for source in (path, data):
        with pytest.raises(ValueError, match="max_jpeg_scans=100"):
            imageio.load_image(source)
    with pytest.raises(ValueError, match="scans"):
        gf.VisionProcessor()(images=str(path))
    assert not decoded  # refused from the markers, before any decoding pass
    monkeypatch.undo()
    assert imageio.load_image(data, max_jpeg_scans=None).size == (96, 64)  # a caller may lift the limit


def test_header_declared_bomb_refused_before_decoding(monkeypatch):
    gif = huge_screen_gif(6000, 6000)
    assert len(gif) < 100
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded a refused image"))
    with pytest.raises(ValueError, match="36000000 pixels"):
        imageio.load_image(gif, max_image_pixels=20_000_000)
    opened = imageio.open_image(gif, max_image_pixels=None)
    assert opened.size == (6000, 6000)
    opened.close()


def _mutants(data: bytes, count: int, seed: int):
    rng = random.Random(seed)
    for _ in range(count):
        d = bytearray(data)
        for _ in range(rng.randint(1, 6)):
            d[rng.randrange(len(d))] = rng.randrange(256)
        if rng.random() < 0.3:
            d = d[:rng.randrange(1, len(d))]
        yield bytes(d)


def _raw_pil_error(data: bytes):
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            image.convert("RGB")
    except Exception as exc:  # what PIL itself raises
        return exc
    return None


@pytest.mark.skipif(not features.check("avif"), reason="Pillow built without AVIF")
def test_corrupt_avif_is_a_value_error():
    good = _encode(Image.fromarray(_photo(24, 32)), "AVIF")
    # Pillow raises a bare RuntimeError for AVIF data libavif cannot decode; find such a file among mutants.
    corrupt = next((d for d in _mutants(good, 300, seed=1) if type(_raw_pil_error(d)) is RuntimeError), None)
    assert corrupt is not None
    with pytest.raises(ValueError, match="image bytes"):
        imageio.load_image(corrupt)
    with pytest.raises(ValueError):
        imageio.to_rgb_uint8(corrupt)


def test_corrupt_blp_is_a_value_error(tmp_path):
    data = bytearray(_encode(Image.fromarray(_photo(8, 8)).convert("P"), "BLP", blp_version="BLP1"))
    data[4:8] = (7).to_bytes(4, "little")       # an unknown compression: Pillow raises NotImplementedError
    assert isinstance(_raw_pil_error(bytes(data)), NotImplementedError)
    path = tmp_path / "bad.blp"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="bad.blp"):
        gf.VisionProcessor()(images=path)
    with pytest.raises(ValueError):
        imageio.load_image(bytes(data))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP", "TIFF", "BMP", "ICO", "TGA", "AVIF"])
def test_fuzzed_files_raise_only_value_error(fmt):
    if fmt == "AVIF" and not features.check("avif"):
        pytest.skip("Pillow built without AVIF")
    good = _encode(Image.fromarray(_photo(24, 32, seed=5)), fmt)
    for data in _mutants(good, 60, seed=sum(fmt.encode())):
        try:
            rgb = imageio.to_rgb_uint8(data, max_image_pixels=1_000_000)
        except ValueError:
            continue
        assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3


# ---------------------------------------------------------------------------------------------------------------
# EXIF orientation: files, bytes and data URLs load like transformers' load_image; PIL images stay as given
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rotated_jpeg():
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the stored pixels are sideways
    return _encode(Image.fromarray(_photo(64, 176, seed=3)), "JPEG", exif=exif.tobytes(), quality=95)


def test_exif_orientation_matches_transformers_load_image(tmp_path, rotated_jpeg):
    pytest.importorskip("transformers")
    from transformers.image_utils import load_image as hf_load_image
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

    path = tmp_path / "phone.jpg"
    path.write_bytes(rotated_jpeg)
    data_url = "data:image/jpeg;base64," + base64.b64encode(rotated_jpeg).decode()
    expected = np.asarray(hf_load_image(str(path)))
    assert expected.shape == (176, 64, 3)  # upright: portrait
    np.testing.assert_array_equal(np.asarray(hf_load_image(data_url)), expected)
    for source in (path, str(path), rotated_jpeg):
        np.testing.assert_array_equal(imageio.to_rgb_uint8(source), expected)

    ours = gf.VisionProcessor(backend="pil")(images=[str(path)], return_tensors="np")
    hf = Glm4vImageProcessorPil()(images=[str(path)], return_tensors="np")
    np.testing.assert_array_equal(ours["image_grid_thw"], np.asarray(hf["image_grid_thw"]))
    assert ours["image_grid_thw"].tolist() == [[1, 12, 4]]   # taller than wide, as the photo was taken
    assert np.abs(ours["pixel_values"] - np.asarray(hf["pixel_values"])).max() <= 1e-6
    # A PIL image passed directly is used as it is (no rotation), as before and as transformers does with one.
    assert imageio.to_rgb_uint8(Image.open(io.BytesIO(rotated_jpeg))).shape == (64, 176, 3)
    assert imageio.image_size(imageio.open_image(rotated_jpeg)) == (64, 176)


def test_rgba_file_loads_like_transformers(tmp_path):
    pytest.importorskip("transformers")
    from transformers.image_utils import load_image as hf_load_image

    rgba = np.dstack([_photo(20, 30, seed=8), np.linspace(0, 255, 600).reshape(20, 30).astype(np.uint8)])
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(path)
    np.testing.assert_array_equal(imageio.to_rgb_uint8(path), np.asarray(hf_load_image(str(path))))


# ---------------------------------------------------------------------------------------------------------------
# video files: the frame size is checked from the header, and only the sampled frames are kept
# ---------------------------------------------------------------------------------------------------------------
def _write_video(path, frames: int, width: int, height: int, codec: str, fps: int = 8) -> None:
    av = pytest.importorskip("av")
    try:
        with av.open(str(path), mode="w") as container:
            stream = container.add_stream(codec, rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            for i in range(frames):
                frame = av.VideoFrame.from_ndarray(_photo(height, width, seed=i), format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    except (av.error.FFmpegError, ValueError) as exc:  # codec missing from this PyAV build
        pytest.skip(f"cannot write {codec}: {exc}")


def test_video_frame_size_refused_before_decoding(tmp_path, monkeypatch):
    from glm4v_fast import video

    path = tmp_path / "clip.mp4"
    _write_video(path, 4, 96, 64, "mpeg4")
    monkeypatch.setattr(video, "_decode", lambda *a: pytest.fail("decoded a refused video"))
    with pytest.raises(ValueError, match="6144 pixels"):
        video.load_video(path, max_image_pixels=5000)
    with pytest.raises(ValueError, match="max_image_pixels=5000"):
        gf.VisionProcessor(max_image_pixels=5000)(videos=str(path))


def test_video_without_frame_count_keeps_only_sampled_frames(tmp_path, monkeypatch):
    from glm4v_fast import video

    path = tmp_path / "clip.webm"
    _write_video(path, 32, 64, 48, "libvpx")  # WebM stores no frame count
    kept = []
    real_decode = video._decode

    def spy(container, stream, wanted):
        frames, count = real_decode(container, stream, wanted)
        kept.append(len(frames))
        return frames, count

    monkeypatch.setattr(video, "_decode", spy)
    frames, info = video.load_video(path)
    assert info["total_num_frames"] == 32 and info["frames_indices"] == [0, 4, 8, 12, 16, 20, 24, 28]
    assert kept == [8] and frames.shape == (8, 48, 64, 3)


def test_png_header_check_does_not_decode(monkeypatch):
    """open_checked reads a PNG's size and orientation without decoding it (Pillow's getexif decodes a PNG to find
    an eXIf chunk after the pixels); an eXIf chunk before the pixels still turns the size upright."""
    plain = _encode(Image.fromarray(_photo(64, 96)), "PNG")
    exif = Image.Exif()
    exif[0x0112] = 6
    tagged = _encode(Image.fromarray(_photo(64, 96)), "PNG", exif=exif.tobytes())
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded during the header check"))
    for data, upright in ((plain, (64, 96)), (tagged, (96, 64))):
        image, size = imageio.open_checked(data, imageio.ImageLimits(), "x", check_size=lambda h, w: (h, w))
        assert size == upright
        image.close()


def test_urls_are_not_fetched():
    for url in ("https://example.com/x.jpg", "s3://bucket/key.png", "file:///tmp/nothing-here.png"):
        with pytest.raises(ValueError, match=r"is a URL: glm4v-fast does not fetch URLs"):
            imageio.load_image(url)
    with pytest.raises(FileNotFoundError, match="image file not found"):
        imageio.load_image("no/such/photo.jpg")
