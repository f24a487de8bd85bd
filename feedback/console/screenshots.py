"""`python -m feedback.console.screenshots` (`make console-screenshots`): a PNG of every console page.

Starts the gateway on 127.0.0.1 against the store and report files that params name (``serve.db_url``,
``reports/``: what ``dvc repro`` left), signs in with a staff key made for the purpose and revoked at the
end, and saves each page at a fixed viewport with Debian's chromium (the same browser the tests drive).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync", "--disable-dev-shm-usage"]
PAGES = {"overview": "/console", "versions": "/console/versions", "ab": "/console/ab", "loop": "/console/loop",
         "training": "/console/training", "data": "/console/data"}
SCREENSHOT_USER = "console-screenshots"


def take(params_path: str, db_url: str | None, out: Path, width: int, height: int, browser=None) -> list[Path]:
    """Screenshot every page into ``out``; ``browser``: a Playwright browser to use (one is started otherwise)."""
    from contextlib import ExitStack

    from playwright.sync_api import sync_playwright
    from sqlalchemy import update
    from sqlalchemy.engine import make_url

    from feedback import store
    from feedback.app import create_app, serve_in_thread
    from feedback.db import StoreNotAtHead, check_at_head, make_engine, session_factory
    from feedback.models import ApiKey, utcnow
    from feedback.config import load_feedback_params

    params = load_feedback_params(params_path)
    url = db_url or params.serve.db_url
    u = make_url(url)
    if u.get_backend_name() == "sqlite" and u.database and not Path(u.database).is_file():
        raise SystemExit(f"no feedback store at {u.database}: `make run` (its simulate stage) fills one, "
                         f"or pass --db-url")
    engine = make_engine(url)
    try:
        check_at_head(engine)
    except StoreNotAtHead as exc:
        raise SystemExit(str(exc)) from None
    factory = session_factory(engine)
    with factory.begin() as s:
        key = store.create_key(s, SCREENSHOT_USER, staff=True)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    try:
        app = create_app(params.serve.model_copy(update={"db_url": url}), params=params)
        with serve_in_thread(app) as base, ExitStack() as stack:
            if browser is None:
                p = stack.enter_context(sync_playwright())
                browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
                stack.callback(browser.close)
            ctx = browser.new_context(viewport={"width": width, "height": height})
            stack.callback(ctx.close)
            page = ctx.new_page()
            page.goto(base + "/console/login")
            page.fill("input[name=key]", key)
            page.click("button[type=submit]")
            page.wait_for_url(base + "/console")
            for name, path in PAGES.items():
                page.goto(base + path)
                page.wait_for_load_state("networkidle")
                target = out / f"{name}.png"
                page.screenshot(path=str(target), full_page=True)
                written.append(target)
                print(f"[console-screenshots] {target}", file=sys.stderr)
    finally:
        with factory.begin() as s:  # the key existed only for these screenshots
            s.execute(update(ApiKey).where(ApiKey.key_hash == store.sha256(key)).values(revoked_at=utcnow()))
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m feedback.console.screenshots", description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--db-url", help="default: serve.db_url in params")
    ap.add_argument("--out", default="docs/console", help="folder for <page>.png (default: %(default)s)")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=900)
    args = ap.parse_args(argv)
    if not Path(CHROMIUM).exists():
        print(f"{CHROMIUM} is missing: apt-get install -y chromium", file=sys.stderr)
        return 2
    written = take(args.params, args.db_url, Path(args.out), args.width, args.height)
    print(f"[console-screenshots] {len(written)} pages → {args.out}/", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
