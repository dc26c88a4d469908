"""Open a self-contained page (summary.html) offline in headless chromium and say what it did.

``static_page.mjs`` drives chromium with ``puppeteer-core``, as ``perfetto_ui.py`` does, but
serves nothing: the page is opened as a ``file://`` URL and every other request it makes is
recorded and refused. It reports console errors, page errors, those requests, and the counts
and attributes of the elements the caller names by CSS selector.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tests.browser.perfetto_ui import browser_unavailable, chromium_path, node_modules

SCRIPT = Path(__file__).resolve().parent / "static_page.mjs"


def available() -> str | None:
    """None when a page can be opened, else why not (for ``pytest.skip``)."""
    return browser_unavailable()


@dataclass
class OpenedPage:
    errors: list[str]
    """Console errors and page errors."""
    requests: list[str]
    """Every URL the page asked for besides itself (all refused)."""
    counts: dict[str, int] = field(default_factory=dict)
    attributes: dict[str, list[str | None]] = field(default_factory=dict)
    console: list[str] = field(default_factory=list)


def open_page(
    path: Path,
    *,
    count: dict[str, str] | None = None,
    attribute: dict[str, tuple[str, str]] | None = None,
    timeout_s: float = 60,
) -> OpenedPage:
    """Open ``path`` offline; ``count`` (name → selector) and ``attribute`` (name →
    (selector, attribute)) say what to read from the loaded page.

    Raises ``RuntimeError`` when the browser cannot run or the page did not load."""
    reason = available()
    if reason is not None:
        raise RuntimeError(f"cannot open a page: {reason}")
    request = {
        "url": Path(path).resolve().as_uri(),
        "chromium": chromium_path(),
        "timeoutMs": int(timeout_s * 1000),
        "count": count or {},
        "attribute": {k: list(v) for k, v in (attribute or {}).items()},
    }
    done = subprocess.run(
        ["node", str(SCRIPT)],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        encoding="utf-8",
        env={**os.environ, "NODE_PATH": str(node_modules())},
        timeout=timeout_s + 30,
        check=False,
    )
    try:
        answer = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise RuntimeError(f"the browser script exited {done.returncode}: {done.stderr}") from None
    if not answer.get("ok"):
        raise RuntimeError(f"{path}: {answer.get('error')}; console: {answer.get('console')}")
    return OpenedPage(
        errors=answer["errors"],
        requests=answer["requests"],
        counts=answer["counts"],
        attributes=answer["attributes"],
        console=answer["console"],
    )
