"""Video preprocessing: frame sampling, resize/normalize/patchify, timestamps, PyAV decoding, bad input.

transformers' Glm4vVideoProcessor needs torchvision. Its frame sampling and patchify are plain Python/torch and
are compared directly. For whole-pipeline parity, where torchvision is installed (``make test-torchvision``) the
processor runs as it is; elsewhere the three torchvision functions it calls (``grayscale_to_rgb``, ``resize``,
``normalize``) are replaced by small stand-ins written from torchvision's semantics (uint8 bicubic antialiased
resize on CPU, float normalize); everything else (sampling, grouping, smart_resize with the clip's frame count,
fused mean/std, patchify, grids) is transformers' own.
"""
from __future__ import annotations

import importlib
import sys
import types

import numpy as np
import pytest
import torch
from _property import given, settings, st  # hypothesis, or stand-ins that skip only the property tests
from PIL import Image

from glm4v_fast.processing import VisionProcessor, smart_resize
from glm4v_fast.video import (load_video, normalize_fused, patchify, resize_uint8, sample_frame_indices,
                              slice_timestamps)


def _clip(t: int, h: int, w: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    """A moving gradient with noise, (T, H, W, C) uint8."""
    rng = np.random.default_rng(seed)
    tt, yy, xx = np.mgrid[0:t, 0:h, 0:w]
    base = np.stack([(xx * 4 + tt * 9) % 256, (yy * 3 + tt * 5) % 256, (xx + yy) % 256] +
                    [np.full_like(xx, 200)] * (channels - 3), -1).astype(np.float64)
    return (base + rng.normal(0, 10, base.shape)).clip(0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# frame sampling


@pytest.mark.parametrize("total, fps, duration, expected", [
    (20, 10, 2.0, [0, 5, 10, 15]),
    (30, 30, None, [0, 15, 29, 29]),          # duration = round(29/30) + 1 = 2 -> 4 picks, two clamp to 29
    (3, 30, 0.1, [0, 0]),                     # floor(0.2) = 0 -> at least one frame, padded to a pair
    (500, 1, 500, list(range(500))),          # > max_duration, 600 samples >= 500 frames -> every frame
    (7, 2, 3.5, [0, 1, 2, 3, 4, 5, 6, 6]),    # 7 picks, odd -> last repeated
])
def test_sample_frame_indices_spec(total, fps, duration, expected):
    assert sample_frame_indices(total, fps, duration) == expected


def test_sample_frame_indices_long_video():
    indices = sample_frame_indices(20000, 25, 800)
    seconds = np.linspace(0, 800, 600)
    assert indices == list(dict.fromkeys(min(19999, int(np.ceil(t * 25))) for t in seconds))
    assert len(indices) == 600 and indices[0] == 0 and indices[-1] == 19999


def test_sample_frame_indices_target_fps_and_max_duration():
    assert sample_frame_indices(100, 10, 10.0, target_fps=1) == [0, 10, 20, 30, 40, 50, 60, 70, 80, 90]
    assert len(sample_frame_indices(1000, 10, 100.0, target_fps=2, max_duration=10)) == 20


@pytest.mark.parametrize("kwargs, match", [
    ({"total_num_frames": 10, "fps": None}, "fps"),
    ({"total_num_frames": 0, "fps": 10}, "no frames"),
    ({"total_num_frames": 10, "fps": -1}, "fps"),
    ({"total_num_frames": 10, "fps": float("nan")}, "fps"),
    ({"total_num_frames": 10, "fps": 10, "duration": -3}, "duration"),
    ({"total_num_frames": 10.5, "fps": 10}, "total_num_frames"),
])
def test_sample_frame_indices_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample_frame_indices(**kwargs)


@pytest.fixture(scope="module")
def hf_video_module():
    pytest.importorskip("transformers")
    # Imported by its full module path: the lazy `transformers.models.glm4v` namespace hands out a placeholder
    # that demands torchvision.
    return importlib.import_module("transformers.models.glm4v.video_processing_glm4v")


@settings(max_examples=200, deadline=None)
@given(total=st.integers(1, 3000), fps=st.sampled_from([1, 5, 12.5, 23.976, 24, 29.97, 30, 60]),
       duration=st.one_of(st.none(), st.floats(0.01, 700)), target=st.sampled_from([1, 2, 3]))
def test_sample_frame_indices_match_transformers(hf_video_module, total, fps, duration, target):
    from transformers.video_utils import VideoMetadata

    hf = hf_video_module.Glm4vVideoProcessor()
    expected = hf.sample_frames(VideoMetadata(total_num_frames=total, fps=fps, duration=duration), fps=target)
    assert sample_frame_indices(total, fps, duration, target_fps=target) == expected.tolist()


# ---------------------------------------------------------------------------------------------------------------
# torch pieces


def test_patchify_matches_transformers(hf_video_module):
    frames = torch.randn(5, 3, 56, 84)
    ours, grid = patchify(frames)
    hf, gt, gh, gw = hf_video_module.Glm4vVideoProcessor().patchify(frames[None], 14, 2, 2)
    assert grid == (gt, gh, gw) == (3, 4, 6)
    torch.testing.assert_close(ours, hf[0], rtol=0, atol=0)


def test_patchify_layout_by_hand():
    frames = torch.arange(2 * 3 * 28 * 28, dtype=torch.float32).reshape(2, 3, 28, 28)
    out, grid = patchify(frames)
    assert grid == (1, 2, 2) and out.shape == (4, 3 * 2 * 14 * 14)
    # row 1 is the top-right patch; its first values are channel 0, frame 0, patch row 0
    np.testing.assert_array_equal(out[1, :14].numpy(), frames[0, 0, 0, 14:28].numpy())
    # frame 1 follows frame 0 inside a channel
    np.testing.assert_array_equal(out[0, 196:210].numpy(), frames[1, 0, 0, :14].numpy())
    # channel 1 follows both frames of channel 0
    np.testing.assert_array_equal(out[2, 392:406].numpy(), frames[0, 1, 14, :14].numpy())


def test_resize_float_branch_matches_torchvision_rule():
    x = torch.from_numpy(_clip(2, 60, 80)).permute(0, 3, 1, 2).contiguous()
    float_branch = resize_uint8(x, 56, 84, native=False)
    expected = torch.nn.functional.interpolate(x.float(), size=(56, 84), mode="bicubic", antialias=True,
                                               align_corners=False).clamp(0, 255).round().to(torch.uint8)
    assert torch.equal(float_branch, expected)
    native = resize_uint8(x, 56, 84)
    assert (native.int() - float_branch.int()).abs().float().mean() < 1.0
    assert resize_uint8(x, 60, 80) is x
    with pytest.raises(ValueError, match="uint8"):
        resize_uint8(x.float(), 56, 84)


def test_normalize_fused_constants():
    x = torch.tensor([0, 128, 255], dtype=torch.uint8).reshape(1, 3, 1, 1).expand(1, 3, 1, 1)
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    out = normalize_fused(x, True, 1 / 255, True, mean, std)
    m32 = torch.tensor(mean, dtype=torch.float32) * 255.0
    s32 = torch.tensor(std, dtype=torch.float32) * 255.0
    expected = (torch.tensor([0.0, 128.0, 255.0]) - m32) / s32
    assert torch.equal(out.flatten(), expected)


def test_slice_timestamps():
    assert slice_timestamps([0, 5, 10, 15, 20, 25], 10, 3) == [0.0, 1.0, 2.0]
    assert slice_timestamps([0, 1, 2], 2, 2) == [0.0, 1.0]
    assert slice_timestamps([0, 1], None, 1) == [0.0]       # unknown fps -> 24, like transformers' processor
    assert slice_timestamps([48, 49], None, 2) == [2.0, 2.0]  # padded to grid_t with the last value


# ---------------------------------------------------------------------------------------------------------------
# whole pipeline


def test_video_grid_and_timestamps_by_hand():
    clip = _clip(30, 90, 120)
    out = VisionProcessor()(videos=clip, video_metadata={"fps": 10, "duration": 3.0, "total_num_frames": 30})
    # 2 fps over 3 s -> frames 0, 5, 10, 15, 20, 25 -> 3 pairs
    h, w = smart_resize(6, 90, 120, 2, 28, 12544, 47040000)
    assert out["video_grid_thw"].tolist() == [[3, h // 14, w // 14]]
    assert out["pixel_values_videos"].shape == (3 * (h // 14) * (w // 14), 1176)
    assert out["pixel_values_videos"].dtype == torch.float32 and out["video_grid_thw"].dtype == torch.int64
    assert out["video_timestamps"] == [[0.0, 1.0, 2.0]]
    # the sampled frames, processed without sampling, give the same pixels
    same = VisionProcessor()(videos=clip[[0, 5, 10, 15, 20, 25]], do_sample_frames=False)
    assert torch.equal(same["pixel_values_videos"], out["pixel_values_videos"])
    assert same["video_timestamps"] == [[0.0, 2 / 24, 4 / 24]]  # fps unknown -> 24, frames 0, 2, 4


def test_video_pixels_by_hand():
    """Resize with the whole-clip budget, fused normalize, pairs of frames, spatial-merge order."""
    clip = _clip(4, 40, 60, seed=2)
    proc = VisionProcessor(do_sample_frames=False)
    out = proc(videos=clip, return_tensors="np")
    h, w = smart_resize(4, 40, 60, 2, 28, 12544, 47040000)
    x = torch.from_numpy(clip).permute(0, 3, 1, 2).contiguous()
    x = torch.nn.functional.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
    mean = torch.tensor(proc.image_mean) * 255.0
    std = torch.tensor(proc.image_std) * 255.0
    x = (x.float() - mean[:, None, None]) / std[:, None, None]
    gh, gw = h // 14, w // 14
    expected = x.reshape(2, 2, 3, gh // 2, 2, 14, gw // 2, 2, 14).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    np.testing.assert_array_equal(out["pixel_values_videos"], expected.reshape(-1, 1176).numpy())
    assert out["video_grid_thw"].tolist() == [[2, gh, gw]]


def test_odd_frame_count_pads_last_frame():
    clip = _clip(3, 56, 56)
    out = VisionProcessor(do_sample_frames=False)(videos=clip, return_tensors="np")
    padded = VisionProcessor(do_sample_frames=False)(videos=clip[[0, 1, 2, 2]], return_tensors="np")
    assert out["video_grid_thw"].tolist() == padded["video_grid_thw"].tolist()
    np.testing.assert_array_equal(out["pixel_values_videos"], padded["pixel_values_videos"])
    single = VisionProcessor(do_sample_frames=False)(videos=clip[:1], return_tensors="np")  # transformers raises
    assert single["video_grid_thw"][0, 0] == 1


def test_frame_list_equals_array():
    clip = _clip(6, 64, 48)
    meta = {"fps": 4, "total_num_frames": 6}
    as_array = VisionProcessor()(videos=clip, video_metadata=meta)
    as_pil = VisionProcessor()(videos=[Image.fromarray(f) for f in clip], video_metadata=meta)
    as_np = VisionProcessor()(videos=[list(clip)], video_metadata=[meta])
    as_tensor = VisionProcessor()(videos=torch.from_numpy(clip), video_metadata=meta)
    for other in (as_pil, as_np, as_tensor):
        assert torch.equal(as_array["pixel_values_videos"], other["pixel_values_videos"])
        assert as_array["video_timestamps"] == other["video_timestamps"]


def test_rgba_and_gray_frames():
    rgba = _clip(2, 56, 56, channels=4)
    rgba[..., 3] = 0  # fully transparent -> white
    out = VisionProcessor(do_sample_frames=False, do_normalize=False)(videos=rgba, return_tensors="np")
    np.testing.assert_allclose(out["pixel_values_videos"], 1.0)
    gray = _clip(2, 56, 56)[..., :1]
    out_gray = VisionProcessor(do_sample_frames=False)(videos=gray, return_tensors="np")
    out_rgb = VisionProcessor(do_sample_frames=False)(videos=np.repeat(gray, 3, -1), return_tensors="np")
    np.testing.assert_array_equal(out_gray["pixel_values_videos"], out_rgb["pixel_values_videos"])


def test_several_videos_and_images_together():
    clips = [_clip(8, 56, 84, 1), _clip(10, 70, 70, 2)]
    metas = [{"fps": 4}, {"fps": 5, "duration": 2.0}]
    image = _clip(1, 100, 100)[0]
    out = VisionProcessor()(images=[image], videos=clips, video_metadata=metas)
    assert out["image_grid_thw"].shape == (1, 3) and out["video_grid_thw"].shape == (2, 3)
    assert out["pixel_values_videos"].shape[0] == int(out["video_grid_thw"].prod(dim=1).sum())
    for clip, meta, grid, stamps in zip(clips, metas, out["video_grid_thw"], out["video_timestamps"]):
        alone = VisionProcessor()(videos=clip, video_metadata=meta)
        assert alone["video_grid_thw"][0].tolist() == grid.tolist() and alone["video_timestamps"][0] == stamps
    # 8 frames at 4 fps, no duration: round(7/4) + 1 = 3 s -> indices 0,2,4,6,7(,7) -> slices start at 0, 4, 7
    # 10 frames at 5 fps over 2 s -> indices 0,3,5,8 -> slices start at 0, 5
    assert out["video_timestamps"] == [[0.0, 1.0, 1.75], [0.0, 1.0]]


def test_video_budget_caps_total_pixels():
    proc = VisionProcessor(video_size={"shortest_edge": 3136, "longest_edge": 28 * 28 * 2 * 20})
    out = proc(videos=_clip(8, 200, 300), do_sample_frames=False)
    t, gh, gw = out["video_grid_thw"][0].tolist()
    assert t == 4 and t * 2 * gh * gw * 14 * 14 <= 28 * 28 * 2 * 20


# ---------------------------------------------------------------------------------------------------------------
# parity with transformers' Glm4vVideoProcessor (torchvision calls replaced by stand-ins)


def _torchvision_standin():
    def resize(image, size, interpolation=None, antialias=True):
        # torchvision v2 resize_image on CPU: bicubic on uint8 is handed to interpolate as is; any leading dims.
        shape = image.shape
        flat = image.reshape(-1, *shape[-3:])
        out = torch.nn.functional.interpolate(flat, size=list(size), mode="bicubic", align_corners=False,
                                              antialias=antialias)
        return out.reshape(*shape[:-2], *size)

    def normalize(x, mean, std, inplace=False):
        mean = torch.as_tensor(mean, dtype=x.dtype).view(-1, 1, 1)
        std = torch.as_tensor(std, dtype=x.dtype).view(-1, 1, 1)
        return x.sub(mean).div(std)

    modes = types.SimpleNamespace(BICUBIC="bicubic", BILINEAR="bilinear", NEAREST="nearest", LANCZOS="lanczos")
    return types.SimpleNamespace(grayscale_to_rgb=lambda v: v, resize=resize, normalize=normalize,
                                 InterpolationMode=modes)


def _torchvision_installed() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # missing, or a build that does not load with this torch
        return False
    return True


@pytest.fixture()
def hf_video_processor(hf_video_module, monkeypatch):
    """transformers' video processor: with torchvision itself where it is installed (``make test-torchvision``),
    else with the stand-ins."""
    if _torchvision_installed():
        return hf_video_module.Glm4vVideoProcessor
    import transformers.image_processing_backends as backends
    import transformers.video_processing_utils as video_utils

    standin = _torchvision_standin()
    for module in (hf_video_module, backends, video_utils):
        monkeypatch.setattr(module, "tvF", standin, raising=False)
    monkeypatch.setattr(backends, "pil_torch_interpolation_mapping", {3: "bicubic"})
    return hf_video_module.Glm4vVideoProcessor


@pytest.mark.parametrize("t, h, w, meta", [
    (20, 60, 80, {"fps": 10, "total_num_frames": 20, "duration": 2.0}),
    (45, 50, 90, {"fps": 15, "total_num_frames": 45}),
    (9, 100, 30, {"fps": 3, "total_num_frames": 9, "duration": 3.0}),
    (8, 201, 299, {"fps": 4, "total_num_frames": 8}),  # odd sides, resized like a photo
])
def test_parity_with_transformers_sampling(hf_video_processor, t, h, w, meta):
    clip = _clip(t, h, w, seed=t)
    hf = hf_video_processor()(videos=[clip], video_metadata=[dict(meta)], return_tensors="pt", return_metadata=True)
    ours = VisionProcessor()(videos=clip, video_metadata=meta)
    assert torch.equal(ours["video_grid_thw"], hf["video_grid_thw"])
    assert (ours["pixel_values_videos"] - hf["pixel_values_videos"]).abs().max() <= 1e-6
    hf_stamps = hf["video_metadata"][0].timestamps[::2]
    assert ours["video_timestamps"][0] == pytest.approx(hf_stamps[: len(ours["video_timestamps"][0])])


def test_parity_with_transformers_no_sampling_odd(hf_video_processor):
    clip = _clip(5, 64, 64, seed=5)
    hf = hf_video_processor()(videos=[clip], do_sample_frames=False, return_tensors="pt")
    ours = VisionProcessor(do_sample_frames=False)(videos=clip)
    assert torch.equal(ours["video_grid_thw"], hf["video_grid_thw"])
    assert (ours["pixel_values_videos"] - hf["pixel_values_videos"]).abs().max() <= 1e-6


def test_parity_with_transformers_small_budget(hf_video_processor):
    clip = _clip(12, 120, 160, seed=7)
    size = {"shortest_edge": 3136, "longest_edge": 28 * 28 * 2 * 40}
    meta = {"fps": 6, "total_num_frames": 12}
    hf = hf_video_processor(size=size)(videos=[clip], video_metadata=[dict(meta)], return_tensors="pt")
    ours = VisionProcessor(video_size=size)(videos=clip, video_metadata=meta)
    assert torch.equal(ours["video_grid_thw"], hf["video_grid_thw"])
    assert (ours["pixel_values_videos"] - hf["pixel_values_videos"]).abs().max() <= 1e-6


# ---------------------------------------------------------------------------------------------------------------
# PyAV decoding


def _write_video(path, frames: np.ndarray, fps: int, codec: str) -> None:
    av = pytest.importorskip("av")
    try:
        with av.open(str(path), mode="w") as container:
            stream = container.add_stream(codec, rate=fps)
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuv420p"
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    except (av.error.FFmpegError, ValueError) as exc:  # codec missing from this PyAV build
        pytest.skip(f"cannot encode {codec}: {exc}")


@pytest.mark.parametrize("suffix, codec", [("mp4", "mpeg4"), ("webm", "libvpx")])
def test_decode_video_file(tmp_path, suffix, codec):
    clip = _clip(16, 48, 64, seed=3)
    path = tmp_path / f"clip.{suffix}"
    _write_video(path, clip, fps=8, codec=codec)
    frames, info = load_video(path)
    assert info["fps"] == 8.0 and info["total_num_frames"] == 16 and info["duration"] == 2.0
    assert info["frames_indices"] == [0, 4, 8, 12]  # 2 fps over 2 s
    assert frames.shape == (4, 48, 64, 3) and frames.dtype == np.uint8
    # lossy codec: close to the source frames
    assert np.abs(frames.astype(int) - clip[[0, 4, 8, 12]].astype(int)).mean() < 20

    out = VisionProcessor()(videos=str(path))
    assert out["video_grid_thw"][0, 0] == 2 and out["video_timestamps"] == [[0.0, 1.0]]
    all_frames, all_info = load_video(path, do_sample_frames=False)
    assert all_frames.shape[0] == 16 and all_info["frames_indices"] == list(range(16))
    same = VisionProcessor()(videos=all_frames, video_metadata={"fps": 8, "total_num_frames": 16, "duration": 2.0})
    assert torch.equal(same["pixel_values_videos"], out["pixel_values_videos"])
    # metadata entries override the container's: at 4 fps the 16 frames last 4 s -> 8 picks, every 2nd frame
    slow = VisionProcessor()(videos=path, video_metadata={"fps": 4})
    assert slow["video_timestamps"] == [[0.0, 1.0, 2.0, 3.0]]


def test_corrupt_and_missing_video_files(tmp_path):
    pytest.importorskip("av")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(500))
    with pytest.raises(ValueError, match="bad.mp4"):
        VisionProcessor()(videos=str(bad))
    with pytest.raises(FileNotFoundError):
        VisionProcessor()(videos=str(tmp_path / "none.mp4"))


def test_missing_pyav_is_explained(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # makes `import av` raise ImportError
    path = tmp_path / "x.mp4"
    path.write_bytes(b"")
    with pytest.raises(ImportError, match=r"glm4v-fast\[video\]"):
        VisionProcessor()(videos=str(path))


# ---------------------------------------------------------------------------------------------------------------
# bad input


def test_missing_fps_is_named():
    with pytest.raises(ValueError, match="fps"):
        VisionProcessor()(videos=_clip(4, 56, 56))
    with pytest.raises(ValueError, match="fps"):
        VisionProcessor()(videos=_clip(4, 56, 56), video_metadata={"total_num_frames": 4})


@pytest.mark.parametrize("video", [np.zeros((0, 56, 56, 3), np.uint8), [], torch.zeros(0, 3, 56, 56, dtype=torch.uint8)])
def test_empty_video(video):
    with pytest.raises(ValueError, match="no frames|empty"):
        VisionProcessor(do_sample_frames=False)(videos=video)


@pytest.mark.parametrize("video, meta, match", [
    (np.zeros((4, 56, 56, 2), np.uint8), None, "channel"),
    (np.zeros((4, 56, 56), np.uint8), None, "4 dimensions|empty|channel"),
    ([np.zeros((56, 56, 3), np.uint8), np.zeros((28, 56, 3), np.uint8)], None, "differ in size"),
    (np.full((2, 56, 56, 3), np.nan, np.float32), None, "NaN"),
    (42, None, "unsupported type"),
    (np.zeros((4, 56, 56, 3), np.uint8), [{"fps": 2}, {"fps": 2}], "video_metadata"),
    (np.zeros((4, 56, 56, 3), np.uint8), "fps=2", "video_metadata"),
])
def test_bad_videos(video, meta, match):
    with pytest.raises(ValueError, match=match):
        VisionProcessor(do_sample_frames=meta is not None)(videos=video, video_metadata=meta)


def test_metadata_frame_count_larger_than_video():
    with pytest.raises(ValueError, match="frames"):
        VisionProcessor()(videos=_clip(4, 56, 56), video_metadata={"fps": 2, "total_num_frames": 100,
                                                                    "duration": 50})


def test_frame_pixel_limit_arrays_lists_and_files(tmp_path):
    """Video frames get the decompression-bomb limit that images get, however the video arrives."""
    clip = _clip(4, 48, 64, seed=5)                        # 3072 pixels per frame
    small = VisionProcessor(max_image_pixels=3000)
    meta = {"fps": 2, "total_num_frames": 4}
    with pytest.raises(ValueError, match=r"frame 0 has 3072 pixels \(64x48\), more than max_image_pixels=3000"):
        small(videos=clip, video_metadata=meta)
    with pytest.raises(ValueError, match="more than max_image_pixels=3000"):
        small(videos=[Image.fromarray(f) for f in clip], video_metadata=meta)
    assert VisionProcessor(max_image_pixels=3072)(videos=clip, video_metadata=meta)["video_grid_thw"].shape == (1, 3)

    path = tmp_path / "clip.mp4"
    _write_video(path, clip, fps=2, codec="mpeg4")
    with pytest.raises(ValueError, match=r"frames has 3072 pixels \(64x48\), more than max_image_pixels=3000"):
        small(videos=str(path))


def test_video_urls_are_not_fetched():
    pytest.importorskip("av")
    with pytest.raises(ValueError, match=r"video 'https://example.com/clip.mp4' is a URL: glm4v-fast does not fetch"):
        VisionProcessor()(videos="https://example.com/clip.mp4")


def test_video_names_in_messages(tmp_path):
    """video_inputs names each video as its caller does (the server: its request field), in its own messages and
    in the decoder's."""
    pytest.importorskip("av")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    with pytest.raises(ValueError, match=r"^cannot open videos\[1\]: "):
        VisionProcessor().video_inputs([np.zeros((4, 56, 56, 3), np.uint8), str(bad)], [{"fps": 2}, None],
                                        names=["videos[0]", "videos[1]"])
    with pytest.raises(ValueError, match=r"^clip A: frame sampling needs the source fps"):
        VisionProcessor().video_inputs([np.zeros((4, 56, 56, 3), np.uint8)], names=["clip A"])
