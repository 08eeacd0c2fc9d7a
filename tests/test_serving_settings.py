"""ServeSettings: every field declared once, with its `glm4v-fast serve` option; the help's figures are true."""
from __future__ import annotations

import argparse
import dataclasses

import pytest

from glm4v_fast.processing import VisionProcessor
from glm4v_fast.serving.server import add_serve_arguments
from glm4v_fast.serving.settings import ServeSettings, settings_from_args


def _parser() -> argparse.ArgumentParser:
    return add_serve_arguments(argparse.ArgumentParser())


def test_every_field_is_an_option_with_its_default():
    parser = _parser()
    actions = {a.dest: a for a in parser._actions}
    fields = dataclasses.fields(ServeSettings)
    assert fields and all(f.name in actions for f in fields)
    defaults = ServeSettings()
    args = parser.parse_args([])
    assert settings_from_args(args) == defaults
    # Parsed options map back onto their fields, with the field's type.
    argv = ["--max-batch-tokens", "4096", "--max-wait-ms", "2.5", "--drain-timeout", "7", "--decode-workers", "3",
            "--cache-mb", "0", "--keep-alive-timeout", "9", "--max-patches-per-request", "1000"]
    settings = settings_from_args(parser.parse_args(argv))
    assert dataclasses.replace(defaults, max_batch_tokens=4096, max_wait_ms=2.5, drain_timeout_s=7.0,
                               decode_workers=3, cache_mb=0.0, keep_alive_timeout_s=9.0,
                               max_patches_per_request=1000) == settings
    assert isinstance(settings.max_batch_tokens, int) and isinstance(settings.drain_timeout_s, float)


@pytest.mark.parametrize("field, value, message", [
    ("max_batch_tokens", 0, "max_batch_tokens must be a positive integer, got 0"),
    ("max_queue", True, "max_queue must be a positive integer, got True"),
    ("decode_workers", -1, "decode_workers must be a non-negative integer, got -1"),
    ("cache_mb", -1.0, "cache_mb must be a non-negative number, got -1.0"),
    ("body_timeout_s", 0, "body_timeout_s must be a positive number, got 0"),
    ("max_wait_ms", float("nan"), "max_wait_ms must be a non-negative number, got nan"),
])
def test_validate_names_the_field(field, value, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        dataclasses.replace(ServeSettings(), **{field: value}).validate()
    if not isinstance(value, bool):
        flag = next(a.option_strings[0] for a in _parser()._actions if a.dest == field)
        with pytest.raises(ValueError, match=message):   # the CLI checks the same way
            settings_from_args(_parser().parse_args([flag, str(value)]))


def test_full_size_image_patches_in_help_are_computed():
    """`--max-patches-per-request`'s help names one full-size image's patches: the most any image resizes to."""
    processor = VisionProcessor()
    full = processor.max_image_patches
    sizes = [(h, w) for h in range(200, 12000, 331) for w in range(200, 12000, 397)] + [(2100, 2800), (2800, 2100)]
    assert max(processor.get_number_of_image_patches(h, w) for h, w in sizes) == full == 30_000
    help_text = " ".join(_parser().format_help().split())
    assert f"one full-size image is at most {full:,} patches" in help_text
