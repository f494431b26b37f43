"""Opening a report.html in headless Chromium, as a reader would, and measuring the page.

Debian's `chromium` and `chromium-driver` packages drive it through Selenium. Where either is
absent the calling test is skipped with the reason; CI need not install them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

# The first screen a reader sees on a laptop-sized browser window.
SCREEN = (1400, 900)

# Everything the checks need, measured in the page: each picture's state and size, and the
# bottom edge of the blocks that must be on the first screen.
_MEASURE = """
const bottom = element => element ? element.getBoundingClientRect().bottom : null;
const heading = [...document.querySelectorAll('h2')].find(h => h.textContent === arguments[0]);
let list = heading;
while (list && list.tagName !== 'UL') list = list.nextElementSibling;
const plot = [...document.images].find(i => i.alt.startsWith(arguments[1]));
return {
  viewport: [window.innerWidth, window.innerHeight],
  verdicts: list ? list.querySelectorAll('li').length : 0,
  verdicts_bottom: bottom(list),
  plot_bottom: plot ? bottom(plot.closest('figure')) : null,
  images: [...document.images].map(i => ({alt: i.alt, complete: i.complete,
                                          natural: i.naturalWidth, shown: i.width})),
  details: document.querySelectorAll('details').length,
};
"""


def chromium():
    """A headless Chromium WebDriver at the first-screen size, or a skip saying what is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed "
                                    "(pip install -e '.[test]')")
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium "
                    "chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", f"--window-size={SCREEN[0]},{SCREEN[1]}"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    session = webdriver.Chrome(options=options, service=webdriver.ChromeService(driver))
    # The page's own viewport, exactly the screen size (the window has no toolbar to subtract).
    session.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": SCREEN[0], "height": SCREEN[1], "deviceScaleFactor": 1, "mobile": False})
    return session


def read_page(session, page: Path, *, heading: str = "", plot: str = "") -> dict:
    """Open `page`, then measure it: the console's errors, every picture, and the bottom edge of
    the list after the h2 `heading` and of the figure whose picture's alt text starts with
    `plot`."""
    session.get_log("browser")  # what an earlier page logged is not this page's
    session.get(Path(page).resolve().as_uri())
    measured = session.execute_script(_MEASURE, heading, plot)
    measured["errors"] = [entry["message"] for entry in session.get_log("browser")
                          if entry["level"] == "SEVERE"]
    return measured
