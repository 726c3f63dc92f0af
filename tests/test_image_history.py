from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from core.errors import BadInputError
from core.tasks.image_history import (
    DATABASE_NAME,
    IMAGES_DIR,
    PNG_SIGNATURE,
    ImageHistory,
    ImageRecord,
    browser_owner,
    user_owner,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ALICE = user_owner("alice@example.com")
BOB = user_owner("bob@example.com")
LARGE_BYTES = 10**9  # a limit no test reaches unless it means to


def fake_png(size_bytes: int = 100, fill: bytes = b"x") -> bytes:
    """Bytes that start as a PNG does: the store keeps them as they are and never decodes them."""
    return PNG_SIGNATURE + fill * (size_bytes - len(PNG_SIGNATURE))


def record(prompt: str = "a lighthouse at dawn", seed: int | None = 42) -> ImageRecord:
    return ImageRecord(
        prompt=prompt, negative_prompt="blurry", model="stand-in/sd", seed=seed, width=64, height=64, steps=4,
        parameters=f"{prompt}\nNegative prompt: blurry\nSteps: 4, Seed: {seed}, Size: 64x64, Model: stand-in/sd",
    )


def files_on_disk(directory: Path) -> list[Path]:
    return sorted(path for path in (directory / IMAGES_DIR).rglob("*") if path.is_file())


@pytest.fixture()
def history(tmp_path: Path):
    with ImageHistory(tmp_path, LARGE_BYTES) as store:
        yield store


def test_a_new_instance_on_the_same_directory_sees_every_image(tmp_path: Path):
    with ImageHistory(tmp_path, LARGE_BYTES) as first:
        ids = [first.add(ALICE, fake_png(fill=bytes([n])), record(f"prompt {n}")) for n in range(3)]
    with ImageHistory(tmp_path, LARGE_BYTES) as reopened:
        assert [entry.id for entry in reopened.list(ALICE)] == ids[::-1]  # newest first
        assert reopened.get(ALICE, ids[1]).png_bytes == fake_png(fill=bytes([1]))
        assert reopened.usage().image_count == 3


def test_the_png_and_its_settings_come_back_as_they_were_kept(history: ImageHistory):
    from PIL import Image

    from core.tasks.pnginfo import png_with_parameters, read_parameters

    text = 'a "quoted" prompt, with commas\nNegative prompt: blurry\nSteps: 4, Seed: 7, Size: 16x16, Model: stand-in/sd'
    png = png_with_parameters(Image.new("RGB", (16, 16), (200, 80, 20)), text)
    kept = record('a "quoted" prompt, with commas', seed=7)
    image_id = history.add(ALICE, png, kept)
    image = history.get(ALICE, image_id)
    assert image.png_bytes == png and read_parameters(image.png_bytes) == text
    assert image.entry.record == kept and image.entry.byte_size == len(png) and image.entry.id == image_id


@pytest.mark.parametrize("full_text", [True, False], ids=["fts5-trigram", "like"])
def test_search_finds_the_query_anywhere_in_the_prompt_in_any_case(tmp_path: Path, full_text: bool):
    with ImageHistory(tmp_path, LARGE_BYTES, full_text=full_text) as history:
        cat = history.add(ALICE, fake_png(), record("A cat on a mat"))
        dog = history.add(ALICE, fake_png(), record("a dog in the rain"))
        history.add(ALICE, fake_png(), record("still life"))
        assert [entry.id for entry in history.list(ALICE, "CAT ON")] == [cat]
        assert {entry.id for entry in history.list(ALICE, "at")} == {cat}  # two characters: below the trigram index
        assert [entry.id for entry in history.list(ALICE, " rain ")] == [dog]  # outer spaces are not part of it
        assert history.count(ALICE, "t") == 3 and history.count(ALICE, "") == 3 and history.count(ALICE, "horse") == 0


def test_a_store_made_without_full_text_is_indexed_when_opened_with_it(tmp_path: Path):
    with ImageHistory(tmp_path, LARGE_BYTES, full_text=False) as plain:
        image_id = plain.add(ALICE, fake_png(), record("a lighthouse at dawn"))
    with ImageHistory(tmp_path, LARGE_BYTES, full_text=True) as indexed:
        assert [entry.id for entry in indexed.list(ALICE, "house at")] == [image_id]


HOSTILE_PROMPTS = {
    "percent": "100% cotton",
    "underscore": "snake_case prompt",
    "injection": "it's'); DROP TABLE images; --",
    "quotes": 'a "quoted" word',
    "backslash": "back\\slash",
    "fts_syntax": "NEAR(cat dog) OR tree* AND ^start",
}


@pytest.mark.parametrize("full_text", [True, False], ids=["fts5-trigram", "like"])
@pytest.mark.parametrize(("query", "expected"), [
    ("%", {"percent"}),
    ("_", {"underscore"}),
    ("0%", {"percent"}),
    ("e_c", {"underscore"}),
    ("'); DROP TABLE images; --", {"injection"}),
    ('"quot', {"quotes"}),
    ("\\", {"backslash"}),
    ("k\\s", {"backslash"}),
    ("OR tree*", {"fts_syntax"}),
    ("NEAR(", {"fts_syntax"}),
    ("*", {"fts_syntax"}),
])
def test_search_takes_sql_like_and_fts_characters_literally(tmp_path: Path, full_text: bool, query: str, expected: set[str]):
    with ImageHistory(tmp_path, LARGE_BYTES, full_text=full_text) as history:
        names = {history.add(ALICE, fake_png(), record(prompt)): name for name, prompt in HOSTILE_PROMPTS.items()}
        assert {names[entry.id] for entry in history.list(ALICE, query)} == expected
        assert history.count(ALICE) == len(HOSTILE_PROMPTS)  # the table is still there, every row in it


def test_a_huge_prompt_is_kept_and_found(history: ImageHistory):
    prompt = "word " * 40_000 + "needle at the end"
    image_id = history.add(ALICE, fake_png(), record(prompt))
    assert [entry.id for entry in history.list(ALICE, "NEEDLE AT")] == [image_id]
    assert history.get(ALICE, image_id).entry.record.prompt == prompt


def test_list_pages_newest_first(history: ImageHistory):
    ids = [history.add(ALICE, fake_png(), record(f"prompt {n}")) for n in range(5)]
    assert [entry.id for entry in history.list(ALICE, limit=2)] == [ids[4], ids[3]]
    assert [entry.id for entry in history.list(ALICE, limit=2, offset=4)] == [ids[0]]


def test_deleting_one_image_removes_its_row_and_its_file(tmp_path: Path, history: ImageHistory):
    kept, deleted = history.add(ALICE, fake_png(100), record()), history.add(ALICE, fake_png(200), record())
    assert history.delete(ALICE, deleted)
    assert history.get(ALICE, deleted) is None and [entry.id for entry in history.list(ALICE)] == [kept]
    assert [path.name for path in files_on_disk(tmp_path)] == [f"{kept}.png"]
    assert history.usage().total_bytes == 100
    assert not history.delete(ALICE, deleted)  # gone already


def test_delete_all_removes_every_image_of_the_owner_and_no_other(tmp_path: Path, history: ImageHistory):
    for _ in range(3):
        history.add(ALICE, fake_png(), record())
    bobs = history.add(BOB, fake_png(), record())
    assert history.delete_all(ALICE) == 3
    assert history.count(ALICE) == 0 and [entry.id for entry in history.list(BOB)] == [bobs]
    assert [path.name for path in files_on_disk(tmp_path)] == [f"{bobs}.png"]


def test_owners_never_see_or_delete_each_others_images(history: ImageHistory):
    alices = history.add(ALICE, fake_png(), record("shared words"))
    bobs = history.add(BOB, fake_png(), record("shared words"))
    anonymous = history.add(browser_owner("0" * 32), fake_png(), record("shared words"))
    assert [entry.id for entry in history.list(ALICE)] == [alices]
    assert [entry.id for entry in history.list(BOB, "shared")] == [bobs]
    assert history.count(ALICE, "shared") == 1 and history.usage(BOB).image_count == 1
    assert history.get(BOB, alices) is None and history.get(ALICE, anonymous) is None
    assert not history.delete(BOB, alices) and history.get(ALICE, alices) is not None
    assert history.delete_all(BOB) == 1 and history.count(ALICE) == 1 and history.usage().image_count == 2


def test_owner_strings_of_users_and_browsers_never_meet():
    assert user_owner(" Alice@Example.com ") == user_owner("alice@example.com")
    assert browser_owner("alice@example.com") != user_owner("alice@example.com")


def test_nothing_on_disk_names_the_owner_or_comes_from_user_input(tmp_path: Path, history: ImageHistory):
    image_id = history.add(user_owner("carol@example.com"), fake_png(), record("../../etc/passwd"))
    (path,) = files_on_disk(tmp_path)
    assert path.name == f"{image_id}.png" and "carol" not in str(path)
    assert b"carol" not in b"".join(file.read_bytes() for file in tmp_path.iterdir() if file.is_file())  # the database, its WAL


@pytest.mark.parametrize("image_id", ["../../history.sqlite3", "", "x" * 32, "0" * 31, "0" * 32 + "/"])
def test_ids_that_are_not_ids_find_nothing(history: ImageHistory, image_id: str):
    history.add(ALICE, fake_png(), record())
    assert history.get(ALICE, image_id) is None and not history.delete(ALICE, image_id)
    assert history.count(ALICE) == 1


def test_the_size_limit_evicts_the_oldest_images_of_any_owner_first(tmp_path: Path):
    with ImageHistory(tmp_path, max_bytes=1000) as history:
        ids = []
        for n in range(10):
            ids.append(history.add(ALICE if n % 2 else BOB, fake_png(300), record(f"prompt {n}")))
            usage = history.usage()
            assert usage.total_bytes <= 1000
            assert sum(path.stat().st_size for path in files_on_disk(tmp_path)) == usage.total_bytes
        assert usage.image_count == 3
        assert {entry.id for owner in (ALICE, BOB) for entry in history.list(owner)} == set(ids[-3:])


def test_an_image_larger_than_the_whole_store_is_refused_and_nothing_is_evicted(tmp_path: Path):
    with ImageHistory(tmp_path, max_bytes=1000) as history:
        history.add(ALICE, fake_png(600), record())
        with pytest.raises(BadInputError, match="1,001 bytes, more than the whole history may hold"):
            history.add(ALICE, fake_png(1001), record())
        assert history.usage().image_count == 1 and len(files_on_disk(tmp_path)) == 1


def test_bytes_that_are_not_a_png_are_refused(tmp_path: Path, history: ImageHistory):
    with pytest.raises(BadInputError, match="Only PNG"):
        history.add(ALICE, b"GIF89a" + b"x" * 100, record())
    assert files_on_disk(tmp_path) == []


def test_a_failed_insert_leaves_no_file_and_no_row(tmp_path: Path, history: ImageHistory):
    with pytest.raises(OverflowError):  # SQLite's integers are 64-bit: the row cannot be written
        history.add(ALICE, fake_png(), record(seed=2**70))
    assert history.usage().image_count == 0 and files_on_disk(tmp_path) == []


def test_opening_drops_rows_whose_file_is_missing(tmp_path: Path):
    with ImageHistory(tmp_path, LARGE_BYTES) as history:
        kept = history.add(ALICE, fake_png(100), record())
        lost = history.add(ALICE, fake_png(200), record())
    next(path for path in files_on_disk(tmp_path) if path.stem == lost).unlink()
    with ImageHistory(tmp_path, LARGE_BYTES) as reopened:
        assert [entry.id for entry in reopened.list(ALICE)] == [kept]
        assert reopened.usage().total_bytes == 100


def test_opening_deletes_files_without_a_row(tmp_path: Path):
    with ImageHistory(tmp_path, LARGE_BYTES) as history:
        kept = history.add(ALICE, fake_png(), record())
    (owner_dir,) = (tmp_path / IMAGES_DIR).iterdir()
    orphans = [owner_dir / f"{'a' * 32}.png", owner_dir / f"{'b' * 32}.partial", tmp_path / IMAGES_DIR / "stray" / "file.png"]
    for orphan in orphans:
        orphan.parent.mkdir(exist_ok=True)
        orphan.write_bytes(fake_png())
    with ImageHistory(tmp_path, LARGE_BYTES) as reopened:
        assert [path.name for path in files_on_disk(tmp_path)] == [f"{kept}.png"]
        assert not (tmp_path / IMAGES_DIR / "stray").exists()
        assert reopened.get(ALICE, kept) is not None


def test_threads_adding_at_once_lose_nothing(tmp_path: Path, history: ImageHistory):
    threads_count, adds_per_thread = 8, 25
    start = threading.Barrier(threads_count)
    ids: list[str] = []
    ids_lock = threading.Lock()

    def add_many(owner: str) -> None:
        start.wait()
        for n in range(adds_per_thread):
            image_id = history.add(owner, fake_png(), record(f"{owner} {n}"))
            with ids_lock:
                ids.append(image_id)

    threads = [threading.Thread(target=add_many, args=(browser_owner(f"{n:032x}"),)) for n in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(ids)) == threads_count * adds_per_thread
    assert history.usage().image_count == threads_count * adds_per_thread == len(files_on_disk(tmp_path))
    assert all(history.count(browser_owner(f"{n:032x}")) == adds_per_thread for n in range(threads_count))


def test_threads_adding_past_the_limit_keep_rows_files_and_total_in_step(tmp_path: Path):
    with ImageHistory(tmp_path, max_bytes=2000) as history:
        threads = [threading.Thread(target=lambda: [history.add(ALICE, fake_png(300), record()) for _ in range(20)]) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        usage = history.usage()
        assert usage.image_count == 6 and usage.total_bytes == 1800
        assert sorted(path.stem for path in files_on_disk(tmp_path)) == sorted(entry.id for entry in history.list(ALICE))


# Each process opens the store (its repair runs) before every add, so one process's repair meets the other's adds.
_ADDING_PROCESS = """
import sys
from pathlib import Path
from core.tasks.image_history import ImageHistory, ImageRecord, PNG_SIGNATURE
directory, owner, adds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
sys.stdin.readline()  # the go signal: both processes start adding together
for n in range(adds):
    with ImageHistory(directory, 10**9) as history:
        history.add(owner, PNG_SIGNATURE + b"x" * 100, ImageRecord(f"{owner} {n}", "", "m", n, 64, 64, 4, "p"))
"""


def test_two_processes_opening_and_adding_to_one_directory_lose_nothing(tmp_path: Path):
    adds = 30
    processes = [
        subprocess.Popen([sys.executable, "-c", _ADDING_PROCESS, str(tmp_path), owner, str(adds)], cwd=PROJECT_ROOT,
                         stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for owner in (ALICE, BOB)
    ]
    for process in processes:
        process.stdin.write("go\n")
        process.stdin.close()
    for process in processes:
        assert process.wait(timeout=120) == 0, process.stderr.read()
    with ImageHistory(tmp_path, LARGE_BYTES) as history:
        assert history.count(ALICE) == adds and history.count(BOB) == adds
        assert len(files_on_disk(tmp_path)) == 2 * adds
        assert all(history.get(ALICE, entry.id) is not None for entry in history.list(ALICE, limit=adds))
    assert (tmp_path / DATABASE_NAME).is_file()
