"""What the engine probe last found, as the warm pool beside it reads it."""

from __future__ import annotations

from dispatcher.control.capacity import ENGINE_DOWN, ENGINE_NO_IMAGE, ENGINE_UP
from dispatcher.session.engine_health import EngineStatus, image_setting
from dispatcher.settings import Settings


def test_the_engine_is_usable_only_when_it_answers_with_its_images() -> None:
    status = EngineStatus()
    back: list[str] = []
    status.on_usable(lambda: back.append(status.state))
    assert status.usable()
    for state in (ENGINE_DOWN, ENGINE_NO_IMAGE, ENGINE_UP, ENGINE_UP, ENGINE_DOWN, ENGINE_UP):
        status.set(state)
        assert status.usable() == (state == ENGINE_UP)
    assert back == [ENGINE_UP, ENGINE_UP], "told once per return, not per probe"


def test_a_missing_image_names_the_setting_an_operator_changes() -> None:
    settings = Settings(ANTHROPIC_ENVIRONMENT_ID="env_1", DISPATCHER_SANDBOX_RUNTIME="docker",
                        DISPATCHER_SANDBOX_IMAGE="sha256:" + "ab" * 32)
    assert image_setting(settings, "sha256:" + "ab" * 32) == "DISPATCHER_SANDBOX_IMAGE"
    assert image_setting(settings, "other:1") == "DISPATCHER_ENVIRONMENTS_FILE"
