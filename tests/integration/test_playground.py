"""The playground page in a real browser: Debian's Chromium (/usr/bin/chromium, never a downloaded browser) driven
by Playwright against the real graph. Type a prompt, generate, see the image and route; route only; replay on
another model and see two images side by side; the history lists them. Saves a screenshot for the README
(`make screenshot` writes docs/playground.png)."""

import os
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
SHOT_DIR = Path(os.environ.get("PRISM_SCREENSHOT_DIR", Path(__file__).resolve().parents[2] / "out"))


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "Debian's chromium is missing: `make system-deps` installs it"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser, base_url):
    context = browser.new_context(viewport={"width": 1200, "height": 1500}, base_url=base_url)
    pg = context.new_page()
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    context.close()
    assert not errors, errors  # no JavaScript error on the page


def _image_loaded(page, selector: str, timeout_ms: int = 120_000) -> None:
    page.wait_for_function(f"() => {{ const i = document.querySelector({selector!r}); "
                           "return i && i.complete && i.naturalWidth > 0; }", timeout=timeout_ms)


def test_generate_route_only_compare_and_history(page):
    page.goto("/")
    assert page.title() == "Prism playground"
    page.get_by_label("Prompt").fill("a red star on a blue background")
    page.get_by_label("Size").select_option("128x128")
    page.get_by_label("Seed (optional)").fill("7")
    page.get_by_role("button", name="Generate").click()
    page.wait_for_selector("#status:has-text('Done in')", timeout=120_000)
    _image_loaded(page, "#result-image")
    assert page.eval_on_selector("#result-image", "i => i.naturalWidth") == 128
    # The render ran as an async job whose events the page followed (the first one, the job's state, always comes).
    assert int(page.eval_on_selector("#gen-progress", "p => p.dataset.events")) >= 1
    facts = page.inner_text("#result-facts")
    assert "Route" in facts and "rule" in facts and "prism-builtin-small" in facts and "Cost" in facts
    rid = page.input_value("#compare-id")
    assert rid

    # Compare: replay the render on the premium tier; the original and the replay side by side.
    page.get_by_label("premium").check()
    page.get_by_role("button", name="Replay").click()
    page.wait_for_selector("#compare-status:has-text('Done in')", timeout=180_000)
    cards = page.locator("[data-testid=compare-card]")
    assert cards.count() == 2
    for i in range(2):
        _image_loaded(page, f"#compare-grid .card:nth-child({i + 1}) img")
    assert "replay: premium" in page.inner_text("#compare-grid")

    # History: the render and its replay are listed, newest first.
    page.get_by_role("button", name="Show").click()
    page.wait_for_selector(f"#history-table tr[data-id='{rid}']", timeout=30_000)
    assert page.locator("#history-table tbody tr").count() >= 2
    assert "replay" in page.inner_text("#history-table tbody tr:first-child")

    SHOT_DIR.mkdir(parents=True, exist_ok=True)
    page.wait_for_selector("#stats-table tbody tr")
    page.evaluate("() => window.scrollTo(0, 0)")
    page.screenshot(path=str(SHOT_DIR / "playground.png"), full_page=False)


def test_route_only_shows_the_decision_without_rendering(page):
    page.goto("/")
    page.get_by_label("Prompt").fill('a poster that says "GRAND OPENING"')
    page.get_by_role("button", name="Route only").click()
    page.wait_for_selector("#status:has-text('Route: typography')", timeout=30_000)
    assert "nothing rendered" in page.inner_text("#result-caption")


def test_phone_width_and_keyboard(browser, base_url):
    context = browser.new_context(viewport={"width": 390, "height": 844}, base_url=base_url)
    page = context.new_page()
    page.goto("/")
    # Nothing wider than the screen: no horizontal scrolling at phone width.
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 390
    # Every form control has a label.
    unlabeled = page.evaluate("""() => [...document.querySelectorAll('input, select, textarea')]
        .filter(e => !(e.labels && e.labels.length)).map(e => e.id)""")
    assert unlabeled == []
    # Keyboard: Tab from the prompt reaches the Generate button.
    page.focus("#prompt")
    for _ in range(12):
        page.keyboard.press("Tab")
        if page.evaluate("() => document.activeElement.id") == "generate":
            break
    assert page.evaluate("() => document.activeElement.id") == "generate"
    context.close()


def test_the_page_asks_for_a_key_where_one_is_required_and_keeps_it_in_the_tab_only(page):
    """The /keyed app requires keys: the page says so before anything else, renders once given a key, shows the
    history's thumbnails through signed links (an <img> sends no key), and keeps the key in sessionStorage only."""
    from tests.integration.conftest import make_key

    key = make_key("keyed", "create", "--tenant", "browser", "--tier", "free")
    page.goto("/keyed/")
    page.wait_for_selector("#key-status:has-text('requires an API key')", timeout=30_000)
    assert page.is_visible("#key-form") and page.evaluate("() => document.activeElement.id") == "api-key"
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Use key").click()
    page.wait_for_selector(f"#key-status:has-text('…{key[-4:]}')")
    page.get_by_label("Prompt").fill("a red star on a blue background")
    page.get_by_label("Size").select_option("64x64")
    page.get_by_role("button", name="Generate").click()
    page.wait_for_selector("#status:has-text('Done in')", timeout=120_000)
    _image_loaded(page, "#result-image")
    assert "User tier" in page.inner_text("#result-facts")
    page.get_by_role("button", name="Show").click()
    _image_loaded(page, "#history-table tbody tr:first-child img", timeout_ms=30_000)
    assert page.evaluate("() => sessionStorage.getItem('prism-api-key')") == key
    assert page.evaluate("() => JSON.stringify(localStorage)") == "{}" and key not in page.context.cookies().__str__()
