from __future__ import annotations

import io

import pandas as pd
import pytest

from helpers import screenshot, wait_for_app_idle

pytestmark = pytest.mark.browser

REVIEWS = pd.DataFrame(
    {
        "id": ["001", "002", "003", "004", "005", "006"],
        "review": [
            "A wonderful film, I loved every minute",
            "Boring and far too long",
            "",
            "The cast was great but the plot was awful",
            "Fine, nothing special",
            "I hated the ending",
        ],
    }
)


def test_sentiment_one_text_then_a_csv_upload_with_download(app_url, page, tmp_path):
    page.goto(f"{app_url}/sentiment")
    wait_for_app_idle(page)
    page.get_by_text("Stand-in model with random weights").first.wait_for()

    text_area = page.get_by_label("Text", exact=True)
    text_area.fill("I loved this movie, the ending was great")
    text_area.press("Control+Enter")
    page.locator("[data-testid='stHtml'] span[title]").first.wait_for()  # the highlighted words
    wait_for_app_idle(page)
    assert page.locator("[data-testid='stHtml'] span[title]").count() == 9  # eight words and the comma
    assert page.get_by_role("heading").filter(has_text="%").count() == 1
    screenshot(page, "sentiment-text")

    page.get_by_role("tab", name="CSV / TSV file").click()
    csv_file = tmp_path / "reviews.csv"
    REVIEWS.to_csv(csv_file, index=False)
    page.locator("input[type=file]").set_input_files(str(csv_file))
    run_button = page.get_by_role("button", name="Classify 5 rows (1 empty cell skipped)")
    run_button.wait_for()
    run_button.click()
    page.get_by_text("Results: reviews.csv, column “review”").wait_for(timeout=60_000)
    page.locator("[data-testid='stVegaLiteChart'] canvas, [data-testid='stVegaLiteChart'] svg").nth(1).wait_for()
    wait_for_app_idle(page)
    assert page.locator("[data-testid='stVegaLiteChart']").count() == 2
    assert page.locator("[data-testid='stException']").count() == 0

    with page.expect_download() as download:
        page.get_by_role("button", name="Download results (CSV)").click()
    assert download.value.suggested_filename == "reviews-sentiment-standin-random-weights.csv"
    written = pd.read_csv(io.BytesIO(open(download.value.path(), "rb").read()), dtype=str, keep_default_na=False)
    assert written.columns.tolist() == ["id", "review", "label", "score", "truncated"]
    assert written["id"].tolist() == REVIEWS["id"].tolist() and written["review"].tolist() == REVIEWS["review"].tolist()
    assert written["label"].tolist()[2] == "" and set(written["label"].tolist()) - {""} <= {"NEGATIVE", "POSITIVE"}
    assert all(0.5 <= float(score) <= 1 for score in written["score"] if score)

    page.set_viewport_size({"width": 1400, "height": 2200})  # Streamlit scrolls inside its own pane: show it all
    page.get_by_text("Results: reviews.csv").scroll_into_view_if_needed()
    page.get_by_text("Stand-in model with random weights").first.scroll_into_view_if_needed()
    path = screenshot(page, "sentiment")
    assert path.stat().st_size > 20_000
