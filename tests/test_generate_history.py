"""The generation page's History panel through AppTest: images kept on disk per owner, across sessions and restarts."""
from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from app_pages import browser_id
from core.app_state import get_image_history
from core.tasks import pnginfo
from core.tasks.image_history import browser_owner
from helpers import wait_for_generation_runs

HOME = str(Path(__file__).resolve().parent.parent / "Home.py")
WAIT_S = 60
BROWSER_A, BROWSER_B = "a" * 32, "b" * 32


@pytest.fixture()
def history_dir(app_env, tmp_path, monkeypatch) -> Path:
    """A history of its own on disk, and this test's sessions coming from browser A (AppTest has no browser to answer)."""
    directory = tmp_path / "history"
    monkeypatch.setenv("DASH_HISTORY_DIR", str(directory))
    monkeypatch.setattr(browser_id, "browser_id", lambda: BROWSER_A)
    get_image_history.clear()
    yield directory
    get_image_history.clear()


def open_page() -> AppTest:
    at = AppTest.from_file(HOME, default_timeout=WAIT_S).run()
    at.switch_page("app_pages/generate.py").run()
    assert not at.exception, at.exception
    return at


def generate(at: AppTest, prompt: str, seed: int) -> AppTest:
    at.toggle(key="generate:random_seed").set_value(False).run()
    at.text_area(key="generate:prompt").input(prompt)
    for name, value in {"width": 64, "height": 64, "steps": 2, "seed": seed}.items():
        at.number_input(key=f"generate:{name}").set_value(value)
    at.run().button(key="generate:start").click().run()
    wait_for_generation_runs(at, WAIT_S)
    return at.run()


def kept_ids(at: AppTest) -> list[str]:
    """The history images the page shows, in its order."""
    return [button.key.removeprefix("generate:history_use:") for button in at.button if (button.key or "").startswith("generate:history_use:")]


def captions(at: AppTest) -> str:
    return " ".join(caption.value for caption in at.caption)


def test_a_generated_image_is_kept_and_a_new_session_after_a_restart_sees_it_and_uses_its_settings(history_dir):
    at = generate(open_page(), "a red lighthouse", seed=7)
    assert not at.exception, at.exception
    (image_id,) = kept_ids(at)
    assert "“a red lighthouse”" in captions(at) and "Your 1 kept image" in captions(at)
    stored = get_image_history().get(browser_owner(BROWSER_A), image_id)
    assert stored is not None and stored.png_bytes == at.session_state["generate:gallery"][0].pngs[0]
    assert "Seed: 7" in pnginfo.read_parameters(stored.png_bytes)

    get_image_history.clear()  # as a restarted process: a new store opened on the same directory
    later = open_page()
    assert kept_ids(later) == [image_id] and "generate:gallery" not in later.session_state
    later.button(key=f"generate:history_use:{image_id}").click().run()
    assert later.text_area(key="generate:prompt").value == "a red lighthouse"
    assert (later.number_input(key="generate:seed").value, later.number_input(key="generate:width").value) == (7, 64)
    assert not later.toggle(key="generate:random_seed").value


def test_search_finds_by_prompt_newest_first_and_delete_removes_the_file(history_dir):
    at = generate(generate(open_page(), "a red lighthouse", seed=1), "a green forest", seed=2)
    forest, lighthouse = kept_ids(at)  # newest first
    at.text_input(key="generate:history_query").input("LIGHT").run()
    assert kept_ids(at) == [lighthouse] and "1 image matching the search" in captions(at)
    at.text_input(key="generate:history_query").input("").run()
    assert kept_ids(at) == [forest, lighthouse]

    at.button(key=f"generate:history_delete:{forest}").click().run()
    assert kept_ids(at) == [lighthouse]
    assert get_image_history().get(browser_owner(BROWSER_A), forest) is None
    assert len(list(history_dir.rglob("*.png"))) == 1


def test_another_browser_does_not_see_the_images(history_dir, monkeypatch):
    generate(open_page(), "a private picture", seed=3)
    monkeypatch.setattr(browser_id, "browser_id", lambda: BROWSER_B)
    other = open_page()
    assert kept_ids(other) == [] and "a private picture" not in captions(other)
    assert any("Nothing kept yet" in info.value for info in other.info)


def test_an_image_made_before_the_browser_answered_is_kept_once_it_has(history_dir, monkeypatch):
    monkeypatch.setattr(browser_id, "browser_id", lambda: None)
    at = generate(open_page(), "before the browser answered", seed=4)
    assert len(at.session_state["generate:gallery"]) == 1 and kept_ids(at) == []
    assert get_image_history().usage().image_count == 0  # no owner yet: nothing on disk
    monkeypatch.setattr(browser_id, "browser_id", lambda: BROWSER_A)  # the component's answer reruns the page
    at.run()
    (image_id,) = kept_ids(at)
    assert get_image_history().get(browser_owner(BROWSER_A), image_id).entry.record.prompt == "before the browser answered"


def test_an_xy_plots_cells_are_kept_each_with_its_own_settings(history_dir):
    at = open_page()
    at.toggle(key="generate:random_seed").set_value(False).run()
    at.text_area(key="generate:prompt").input("a red bicycle")
    for name, value in {"width": 64, "height": 64, "steps": 2, "seed": 5}.items():
        at.number_input(key=f"generate:{name}").set_value(value)
    at.run().selectbox(key="generate:sweep_X_kind").set_value("Seed").run()
    at.text_input(key="generate:sweep_X_values").input("1-3").run()
    at.button(key="generate:sweep_start").click().run()
    assert at.session_state["generate:sweep_run"].wait(WAIT_S)
    at.run()
    assert not at.exception, at.exception
    kept = [get_image_history().get(browser_owner(BROWSER_A), image_id) for image_id in kept_ids(at)]
    assert sorted(image.entry.record.seed for image in kept) == [1, 2, 3] and {image.entry.record.prompt for image in kept} == {"a red bicycle"}
    assert all(pnginfo.parse_parameters(pnginfo.read_parameters(image.png_bytes)).settings.seed == image.entry.record.seed for image in kept)
    assert captions(at).count("2 steps · PNDM · CFG 7.5") == 3  # each card says how it was sampled


def test_an_unconditional_images_card_names_no_sampler_or_cfg():
    from app_pages.generate_history import sampling
    from core.tasks.image_history import ImageRecord

    ddpm = pnginfo.unconditional_parameters_text(50, 5, "google/ddpm-cifar10-32", is_standin=False)
    assert sampling(ImageRecord("", "", "google/ddpm-cifar10-32", 5, 32, 32, 50, ddpm)) == ""
