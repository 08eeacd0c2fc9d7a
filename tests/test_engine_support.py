"""What the vLLM and SGLang integrations share (glm4v_fast/integrations/engines.py), without either engine:
the version gate, the on/off switch, the tower choice and its log line, the lazy package exports."""
from __future__ import annotations

import logging

import pytest

from glm4v_fast.integrations import engines

TESTED = engines.TestedVersions(engine="Engine", extra="engine", first=(1, 2, 3), last=(1, 4, 0),
                                text=">=1.2.3,<1.4.1", without_plugin="ENGINE_PLUGINS without it")


@pytest.mark.parametrize("version", ["1.2.3", "1.3.0", "1.4.0", "1.4.0rc1", "1.3.9+cpu"])
def test_tested_versions_accept_the_range(version):
    assert TESTED.check(version) == version


@pytest.mark.parametrize("version", ["1.2.2", "1.4.1", "2.0.0", "0.9.9"])
def test_tested_versions_refuse_outside_the_range_naming_both_and_the_way_out(version):
    with pytest.raises(RuntimeError) as info:
        TESTED.check(version)
    message = str(info.value)
    assert f"tested with Engine >=1.2.3,<1.4.1, but Engine {version} is installed" in message
    assert "pip install 'glm4v-fast[engine]'" in message and "ENGINE_PLUGINS without it" in message


def test_tested_versions_say_what_is_missing_or_unreadable():
    with pytest.raises(RuntimeError, match=r"needs Engine: pip install 'glm4v-fast\[engine\]'"):
        TESTED.check(None)
    with pytest.raises(RuntimeError, match="cannot read the installed Engine version '1.x'"):
        TESTED.check("1.x")


@pytest.mark.parametrize("value, expected", [(None, None), ("", None), ("auto", None), (True, True), ("ON", True),
                                             (" yes ", True), ("1", True), (False, False), ("off", False),
                                             ("0", False), ("No", False)])
def test_parse_flag(value, expected):
    assert engines.parse_flag(value, "X") is expected


def test_parse_flag_refuses_other_values_naming_the_setting():
    with pytest.raises(ValueError, match="MY_VAR must be one of 1/0, true/false, on/off or auto, got 'maybe'"):
        engines.parse_flag("maybe", "MY_VAR")


def test_decide():
    kwargs = dict(engine="Engine", how_to_unforce="Unset X", default=False, default_reason="the default")
    assert engines.decide(None, "", [], **kwargs) == engines.TowerChoice(False, False, "the default")
    assert engines.decide(None, "", [], **{**kwargs, "default": True}).use_fast
    assert engines.decide(True, "X=1", [], **kwargs) == engines.TowerChoice(True, True, "forced on by X=1")
    assert engines.decide(False, "X=0", ["fp8"], **kwargs) == engines.TowerChoice(False, True, "forced off by X=0")
    kept = engines.decide(None, "", ["fp8", "lora"], **{**kwargs, "default": True})
    assert kept == engines.TowerChoice(False, False, "Engine's tower kept: fp8; lora")
    with pytest.raises(ValueError, match=r"forced on \(X=1\) but cannot serve this model: fp8\. Unset X "
                                         r"\(Engine's tower is then used\) or drop the option"):
        engines.decide(True, "X=1", ["fp8"], **kwargs)


def test_choice_log_says_each_choice_once(caplog):
    log = engines.ChoiceLog(logging.getLogger("engine.glm4v_fast"), "Engine")
    ours, theirs = engines.TowerChoice(True, True, "forced"), engines.TowerChoice(False, False, "default")
    with caplog.at_level(logging.INFO, logger="engine.glm4v_fast"):
        for _ in range(3):
            log("Arch", ours, "torch", "sdpa")
            log("Arch", theirs)
        log("Arch", ours, "triton", "sdpa")
    assert [r.getMessage() for r in caplog.records] == [
        "glm4v-fast: Arch uses glm4v-fast's vision tower (kernels=torch, attention=sdpa; forced)",
        "glm4v-fast: Arch uses Engine's own vision tower (default)",
        "glm4v-fast: Arch uses glm4v-fast's vision tower (kernels=triton, attention=sdpa; forced)"]


def test_plugin_may_register(monkeypatch):
    def untested():
        raise RuntimeError("untested")

    monkeypatch.delenv("ENGINE_SWITCH", raising=False)
    assert engines.plugin_may_register(lambda: "1.3.0", "ENGINE_SWITCH") is True
    with pytest.raises(RuntimeError, match="untested"):
        engines.plugin_may_register(untested, "ENGINE_SWITCH")
    monkeypatch.setenv("ENGINE_SWITCH", "0")          # switched off: the engine runs as shipped, no error
    assert engines.plugin_may_register(untested, "ENGINE_SWITCH") is False
    monkeypatch.setenv("ENGINE_SWITCH", "1")
    with pytest.raises(RuntimeError, match="untested"):
        engines.plugin_may_register(untested, "ENGINE_SWITCH")


def test_lazy_exports():
    getattr_ = engines.lazy_exports("glm4v_fast.integrations", {"ChoiceLog": "engines"})
    assert getattr_("ChoiceLog") is engines.ChoiceLog
    with pytest.raises(AttributeError, match="module 'glm4v_fast.integrations' has no attribute 'missing'"):
        getattr_("missing")
