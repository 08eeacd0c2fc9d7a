"""The /v1/embeddings request: its fields, how base64 images are read, and the errors a client sees.

Every client mistake becomes an ApiError: an HTTP status, an OpenAI-style error type and a message naming the
field (`images[3]`, `videos[0].fps`) and, for a limit, the server option that sets it.
"""
from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass, field

import torch
from starlette.responses import JSONResponse

from ..validation import is_positive_number

#: Every field a request may carry; any other is refused with 400 naming it (a misspelt option must not be ignored).
#: `model` and `user` are accepted (and ignored) because OpenAI clients always send them.
REQUEST_FIELDS = ("images", "input", "videos", "encoding_format", "dtype", "model", "user")
ENCODING_FORMATS = ("float", "base64")
#: dtypes of binary answers (base64 and safetensors): little-endian raw values; bfloat16 as its 16-bit pattern.
ANSWER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPES = ANSWER_DTYPES  # the name this table had before the server was split into modules
#: The Accept value that asks for a safetensors body instead of JSON.
SAFETENSORS_MEDIA_TYPE = "application/vnd.safetensors"
_VIDEO_FIELDS = ("frames", "fps")
_WHITESPACE = b" \t\r\n"
# A URL scheme ("http:", "file:", "s3:", "C:" of a Windows path): base64 never contains ":".
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]{0,31}:")


class ApiError(Exception):
    """A client-visible error: HTTP status, OpenAI-style error type, message, extra headers."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.headers = status, message, type, headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type}}, status_code=self.status,
                            headers=self.headers)


def too_large(message: str) -> ApiError:
    return ApiError(413, message, "request_too_large")


@dataclass
class EmbeddingRequest:
    """A parsed /v1/embeddings body. `videos` items are base64 container files (str) or {"frames", "fps"}."""

    images: list
    videos: list = field(default_factory=list)
    encoding_format: str = "float"
    dtype: str = "float32"
    images_field: str = "images"   # or "input": error messages name the field the client used


def wants_safetensors(accept: str) -> bool:
    """True when an Accept header asks for the safetensors answer (JSON stays the default)."""
    return any(part.split(";")[0].strip().lower() == SAFETENSORS_MEDIA_TYPE for part in accept.split(","))


def _no_fetching(what: str, kind: str) -> ApiError:
    return ApiError(400, f"{what} looks like a {kind}; the server fetches and reads nothing (that would let "
                         "clients reach its network and files): send the file's bytes as base64 or as a "
                         "data:<mime>;base64,<data> URL")


def b64decode(text: str, what: str) -> bytes:
    """One base64 string or data: URL of a request -> its bytes; URLs and file paths are refused, saying so."""
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or not header.endswith(";base64"):
            raise ApiError(400, f"{what} is a data: URL without ';base64,' data")
    elif _SCHEME.match(text):
        raise _no_fetching(what, f"URL ({text[:48]!r})")
    try:
        data = text.encode("ascii")
        # validate=True rejects stray characters instead of silently skipping them. Line breaks (MIME-style
        # base64) are legitimate: dropped first with one C pass (splitting on them would build a string per piece).
        raw = base64.b64decode(data.translate(None, _WHITESPACE), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError) as exc:
        # "cat.png", "./x/y.jpg", "~/a", "C:\\a.png": '.', '~' and '\\' are not base64 characters.
        if len(text) < 4096 and (text.startswith("~") or "\\" in text or re.search(r"\.[A-Za-z0-9]{1,5}$", text)):
            raise _no_fetching(what, f"file path ({text[:48]!r})") from None
        if isinstance(exc, UnicodeEncodeError):
            raise ApiError(400, f"{what} is not valid base64: it has non-ASCII characters") from None
        raise ApiError(400, f"{what} is not valid base64: {exc}") from None
    if not raw:
        raise ApiError(400, f"{what} is empty")
    return raw


def _parse_videos(videos) -> tuple[list, int]:
    """Validate `videos`; returns them and how many encoded files (containers and frames) they carry."""
    if not isinstance(videos, list):
        raise ApiError(400, f"'videos' must be a list, got {type(videos).__name__}")
    files = 0
    for j, video in enumerate(videos):
        what = f"videos[{j}]"
        if isinstance(video, str):
            files += 1
            continue
        if not isinstance(video, dict):
            raise ApiError(400, f"{what} must be a base64 video file or an object {{\"frames\": [base64 images], "
                                f"\"fps\": N}}, got {type(video).__name__}")
        unknown = [k for k in video if k not in _VIDEO_FIELDS]
        if unknown:
            raise ApiError(400, f"unknown field {unknown[0]!r} in {what}; a video object has {list(_VIDEO_FIELDS)}")
        frames = video.get("frames")
        if not isinstance(frames, list) or not frames:
            raise ApiError(400, f"{what}.frames must be a non-empty list of base64 images")
        for i, frame in enumerate(frames):
            if not isinstance(frame, str):
                raise ApiError(400, f"{what}.frames[{i}] must be a base64 string or a data: URL, "
                                    f"got {type(frame).__name__}")
        if not is_positive_number(video.get("fps")):
            raise ApiError(400, f"{what}.fps must be a positive number (the frames' rate, used to sample them at "
                                f"the processor's rate and to time the answer), got {video.get('fps')!r}")
        files += len(frames)
    return videos, files


def parse_request(body: bytes, max_images: int = 64, binary: bool = False) -> EmbeddingRequest:
    """The JSON body -> EmbeddingRequest, or ApiError 400/413. `binary`: the answer will be a safetensors body."""
    # A valid request has a handful of JSON values per image; a body of millions of tiny values (`[0,0,0,...]`)
    # would cost seconds and gigabytes to parse. Commas and brackets bound the value count; counting them is cheap.
    values = body.count(b",") + body.count(b"[") + body.count(b"{")
    if values > 4 * max_images + 256:
        raise too_large(f"request body has about {values} JSON values; a request carries at most "
                        f"--max-images-per-request {max_images} images and a few fields")
    try:
        payload = json.loads(body)
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, bad UTF-8, and integer literals over Python's digit limit
        raise ApiError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(payload).__name__}")
    unknown = [k for k in payload if k not in REQUEST_FIELDS]
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r}; a request may have {list(REQUEST_FIELDS)}")
    if "images" in payload and "input" in payload:
        raise ApiError(400, "give 'images' or its alias 'input', not both")
    key = "input" if "input" in payload else "images"
    videos, video_files = _parse_videos(payload.get("videos", []))
    if key not in payload and not videos:
        raise ApiError(400, "missing field 'images' (a list of base64 strings or data: URLs; alias 'input') "
                            "or 'videos'")
    images = payload.get(key, [])
    if key == "input" and isinstance(images, str):
        images = [images]  # OpenAI's `input` may be a single item
    if not isinstance(images, list):
        raise ApiError(400, f"{key!r} must be a list of base64 strings, got {type(images).__name__}")
    if not images and not videos:
        raise ApiError(400, f"{key!r} is empty")
    if len(images) + video_files > max_images:
        videos_part = f" and {video_files} video files or frames" if videos else ""
        raise too_large(f"request has {len(images)} images{videos_part}, more than --max-images-per-request "
                        f"{max_images}")
    for i, item in enumerate(images):
        if not isinstance(item, str):
            raise ApiError(400, f"{key}[{i}] must be a base64 string or a data: URL, got {type(item).__name__}")
    fmt = payload.get("encoding_format", "float")
    if fmt not in ENCODING_FORMATS:
        raise ApiError(400, f"'encoding_format' must be one of {ENCODING_FORMATS}, got {fmt!r}")
    dtype = payload.get("dtype", "float32")
    if dtype not in ANSWER_DTYPES:
        raise ApiError(400, f"'dtype' must be one of {tuple(ANSWER_DTYPES)}, got {dtype!r}")
    if dtype != "float32" and fmt == "float" and not binary:
        raise ApiError(400, f"'dtype' {dtype!r} needs \"encoding_format\": \"base64\" (or Accept: "
                            f"{SAFETENSORS_MEDIA_TYPE}); JSON numbers are float32 values")
    return EmbeddingRequest(images, videos, fmt, dtype, key)
