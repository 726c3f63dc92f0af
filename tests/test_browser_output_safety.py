"""In a real browser, a user's Markdown is shown as typed and never makes any viewer's browser fetch a URL (issue 17.2)."""
from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator

import pytest

from helpers import screenshot, wait_for_app_idle

pytestmark = pytest.mark.browser
WAIT_MS = 120_000


class RecordingServer(http.server.ThreadingHTTPServer):
    """A local HTTP server that answers 404 to everything and keeps every path it was asked for."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
                server.requests.append(self.path)
                self.send_error(404)

            def log_message(self, *args) -> None:  # keep the test output clean
                pass

        super().__init__(("127.0.0.1", 0), Handler)


@pytest.fixture()
def tracker() -> Iterator[RecordingServer]:
    server = RecordingServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def image_markdown(server: RecordingServer, name: str) -> str:
    return f"![img](http://127.0.0.1:{server.server_address[1]}/{name}.png)"


def submit(page, label: str, text: str) -> None:
    box = page.get_by_label(label, exact=True)
    box.fill(text)
    box.press("Control+Enter" if box.evaluate("e => e.tagName") == "TEXTAREA" else "Enter")
    wait_for_app_idle(page)


def test_a_prompt_with_a_markdown_image_is_shown_as_typed_and_fetched_by_nobody(app_url, page, tracker):
    prompt = f"**bold** :red[x] $x^2$ {image_markdown(tracker, 'prompt')}"
    page.goto(f"{app_url}/generate")
    page.get_by_text("random weights").first.wait_for(timeout=WAIT_MS)
    wait_for_app_idle(page)
    submit(page, "Prompt", prompt)
    for label, value in (("Width", "64"), ("Height", "64"), ("Steps", "2")):
        submit(page, label, value)
    page.get_by_role("button", name="Generate").click()
    page.get_by_text("This session's images (1), newest first").wait_for(timeout=WAIT_MS)
    wait_for_app_idle(page)
    screenshot(page, "output-safety-generate")
    assert tracker.requests == []
    caption = page.locator("[data-testid='stCaptionContainer']").filter(has_text="“")
    assert f"“{prompt}”" in caption.first.inner_text()


def test_sentiment_texts_and_a_typed_model_with_markdown_images_are_fetched_by_nobody(app_url, page, tracker):
    page.goto(f"{app_url}/sentiment")
    page.get_by_text("Stand-in model with random weights").first.wait_for(timeout=WAIT_MS)
    wait_for_app_idle(page)
    text = f"Loved it **really** {image_markdown(tracker, 'text')}"
    submit(page, "Text", text)
    page.locator("[data-testid='stHtml'] span[title]").first.wait_for(timeout=WAIT_MS)
    assert text in page.locator("[data-testid='stHtml']").first.inner_text()

    page.get_by_text("Model", exact=True).first.click()  # the expander holding the model field
    model = f"bad {image_markdown(tracker, 'model')}"
    submit(page, "Text-classification model: a Hub repo id (owner/name) or a local folder in Hub layout", model)
    error = page.locator("[data-testid='stAlertContentError']").first
    error.wait_for(timeout=WAIT_MS)
    screenshot(page, "output-safety-sentiment")
    assert tracker.requests == []
    assert f"model '{model}' is neither a Hub repo id" in error.inner_text()
