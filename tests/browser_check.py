"""Open an HTML report in headless Chromium: a screenshot, and the console errors it printed.

    python tests/browser_check.py out/pred/evaluation/index.html --screenshot report.png

Uses Debian's ``chromium`` (``apt-get install chromium``); exits 1 when the page logged a JavaScript
error or a resource that failed to load, 2 when no Chromium is installed.  The flags keep Chromium off
the network (background services off), so the check works on a closed machine.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

#: console lines that mean the page is broken
ERROR_PATTERNS = (r"Uncaught", r"Failed to load resource", r"net::ERR_FILE_NOT_FOUND",
                  r"Not allowed to load local resource")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--enable-logging=stderr", "--v=0", "--hide-scrollbars")


def find_chromium() -> str | None:
    """Path of a Chromium / Chrome executable, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def check_page(html: str | Path, screenshot: str | Path | None = None, size: tuple[int, int] = (1280, 2000),
               timeout: float = 90.0) -> list[str]:
    """Load ``html`` headless; return the console error lines (empty: the page is clean).

    Args:
        html: the page (a local file).
        screenshot: where to write a PNG of the page (optional).
        size: window size in pixels (width, height).
        timeout: seconds before giving up.
    """
    exe = find_chromium()
    if exe is None:
        raise FileNotFoundError("no Chromium found: apt-get install chromium")
    url = Path(html).resolve().as_uri()
    with tempfile.TemporaryDirectory() as profile:
        args = [exe, *FLAGS, f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}"]
        args += [f"--screenshot={Path(screenshot).resolve()}"] if screenshot else ["--dump-dom"]
        proc = subprocess.run(args + [url], capture_output=True, text=True, timeout=timeout)
    console = [ln for ln in proc.stderr.splitlines() if "CONSOLE" in ln or "net::" in ln or "Uncaught" in ln]
    return [ln for ln in console if any(re.search(p, ln) for p in ERROR_PATTERNS)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("html")
    ap.add_argument("--screenshot", default=None)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=2000)
    args = ap.parse_args(argv)
    try:
        errors = check_page(args.html, args.screenshot, (args.width, args.height))
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for line in errors:
        print(line)
    print(f"{args.html}: {'OK, no console errors' if not errors else f'{len(errors)} console error(s)'}"
          + (f"; screenshot {args.screenshot}" if args.screenshot and os.path.exists(args.screenshot) else ""))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
