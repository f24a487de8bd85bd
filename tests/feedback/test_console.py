"""The web console in a real browser: Debian's chromium driven by Playwright against a real gateway on 127.0.0.1.

The store is filled by the simulated users (console_fixtures); every number checked on a page is compared
with what `ownllm feedback report`'s functions (feedback.analytics) or the report files say.
"""

from __future__ import annotations

import html
import json
import os
import re
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from console_fixtures import REPO, build_console_world
from feedback import analytics, store
from feedback.app import create_app
from feedback.config import ServeConfig
from feedback.db import session_factory, upgrade
from feedback.models import AuditEvent, Completion, RolloutState, User, utcnow
from gateway_fixtures import live_server
from pipeline.config import load_params

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync", "--disable-dev-shm-usage"]
PAGES = ["/console", "/console/versions", "/console/ab", "/console/loop", "/console/training", "/console/data"]


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: `apt-get install -y chromium` (.ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir):
    return build_console_world(tmp_path_factory.mktemp("console"), tiny_model_dir)


@pytest.fixture(scope="module")
def console(world):
    params = load_params(world.params_path)
    app = create_app(ServeConfig(db_url=world.db_url), params=params)
    with live_server(app) as url:
        yield url


def open_page(browser, url: str, key: str):
    """A fresh browser context signed in through the login form; fails the test on any page error."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    ctx.set_default_timeout(10_000)
    page = ctx.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(url + "/console")
    assert "/console/login" in page.url  # no key yet: sent to the login form
    page.fill("input[name=key]", key)
    page.click("button[type=submit]")
    page.wait_for_url(url + "/console")
    return ctx, page, errors


def cells(page, row_selector: str) -> dict[str, str]:
    row = page.locator(row_selector)
    return {c: row.locator(f"td.{c}").inner_text() for c in ("served", "shown", "accepted", "rejected", "ignored", "rate")}


def fmt(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def test_every_page_shows_the_stores_and_the_reports_numbers(browser, console, world):
    params = load_params(world.params_path)
    factory = session_factory(world.db_url)
    ctx, page, errors = open_page(browser, console, world.keys["staff"])
    try:
        # Overview: the week's table is `ownllm feedback report`'s rows for the same window.
        with factory() as s:
            rep = analytics.report(s, utcnow() - timedelta(days=7), None, params.feedback.ab_alpha,
                                   params.feedback.ab_power, params.feedback.ignored_after_s)
        rows = rep["by_version_language"]
        assert rows and sum(r["shown"] for r in rows) > 0
        for r in rows:
            got = cells(page, f'#acceptance-week tr[data-model="{r["model"]}"][data-language="{r["language"]}"]')
            assert got == {"served": f"{r['served']:,}", "shown": f"{r['shown']:,}", "accepted": f"{r['accepted']:,}",
                           "rejected": f"{r['rejected']:,}", "ignored": f"{r['ignored']:,}", "rate": fmt(r["rate"])}
        assert page.locator("#acceptance-week tbody tr").count() == len(rows)
        assert "ft-a (ab:50)" in page.locator('#deployed td[data-state="ab"]').inner_text()
        assert page.locator('figure[data-chart="daily"] canvas').count() >= 1  # uPlot drew the charts

        # A/B: arms and verdict as the report's experiment_report gives them.
        page.goto(console + "/console/ab")
        exp = rep["experiments"][0]
        assert page.locator("#exp-1 .verdict").inner_text() == f"Verdict: {exp['verdict']}"
        for arm in exp["arms"]:
            row = page.locator(f'#exp-1 tr[data-arm="{arm["arm"]}"]')
            assert row.locator("td.shown").inner_text() == f"{arm['shown']:,}"
            assert row.locator("td.rate").inner_text() == fmt(arm["rate"])
            assert row.locator("td.users-shown").inner_text() == f"{arm['users_shown']:,}"
        # the difference's CI and p-value are the ones clustered by user, and the page says how many users
        assert exp["counts"] == "users" and "users" in exp["verdict"]
        if exp["p_value"] is None:
            assert page.locator("#exp-1 .clustered").count() == 0
        else:
            clustered = page.locator("#exp-1 .clustered")
            assert clustered.locator(".p").inner_text() == f"{exp['p_value']:.4f}"
            assert clustered.locator(".ci").inner_text() == f"[{exp['ci95'][0]:.3f}, {exp['ci95'][1]:.3f}]"
            assert f"counting {exp['users']:,} users" in clustered.inner_text()
        with factory() as s:
            users = s.execute(select(User.name)).scalars().all()
        assert sum(int(page.locator(f'#exp-1 tr[data-arm="{a}"] td.users').inner_text()) for a in ("control", "treatment")) \
            == sum(1 for u in users if u.startswith("sim-user-"))  # every simulated user landed in one arm

        # Versions: lineage and the gate report of ft-a.
        page.goto(console + "/console/versions")
        ft = page.locator("#version-ft-a")
        assert ft.locator("td.parent").inner_text() == "base"
        with factory() as s:
            gate = store.get_version(s, "ft-a").eval_results["gate"]
        assert f"Gate report: against base — {'passed' if gate['passed'] else 'FAILED'}" in ft.inner_text()
        u = gate["paired"]["tests"]["utility"]
        assert ft.locator('tr[data-test="utility"] td.diff').inner_text() == f"{u['diff']:.3f}"
        assert ft.locator('tr[data-test="utility"] td.ci').inner_text() == f"[{u['ci95'][0]:.3f}, {u['ci95'][1]:.3f}]"

        # Loop, training, data: the report files' numbers.
        loop = json.loads((Path(params.tracking.reports_dir) / "loop.json").read_text())
        page.goto(console + "/console/loop")
        m = loop["rounds"][0]["metrics"]["heldout.utility_per_cursor"]
        row = page.locator('#round-1 tr[data-metric="heldout.utility_per_cursor"]')
        assert row.locator("td").nth(2).inner_text() == f"{m['tuned']:.3f}"
        assert row.locator("td").nth(4).inner_text() == f"[{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]"
        mc = loop["rounds"][0]["paired"]["mcnemar"]
        assert f"only the tuned model {mc['only_tuned']}, p = {mc['p_value']:.4f}" in page.inner_text("#round-1")
        assert page.locator("#round-1 table.snapshot").inner_text().split() == ["pairs", "sft", "unpaired", "9", "12", "3"]

        page.goto(console + "/console/training")
        assert page.locator("#last-val").inner_text() == f"{float(open(Path(params.train.reports_dir) / 'val_loss.csv').read().split()[-1].split(',')[1]):.4f}"
        assert page.locator("#loss-chart canvas").count() >= 1
        assert page.locator("#spikes tbody tr").first.locator("td").first.inner_text() == "60"
        page.click("#spikes a")  # the spike's bisect report
        assert "Spike at step 60" in page.inner_text("main") and "doc-aaaa" in page.inner_text("#bisect-docs")

        stats = json.loads((Path(params.data.stats.out) / "stats.json").read_text())
        page.goto(console + "/console/data")
        assert page.locator('#funnel tr[data-stage="dedup"] td.documents').inner_text() == \
            f"{stats['funnel']['dedup']['documents']:,}"
        assert page.locator("#funnel tbody tr").count() == len(stats["funnel"])
        for lang, row in stats["by_lang"].items():
            assert page.locator(f'#by-lang tr[data-language="{lang}"] td.documents').inner_text() == f"{row['documents']:,}"
        assert errors == []
    finally:
        ctx.close()


def test_non_staff_sees_only_its_own_usage_no_controls_and_gets_403(browser, console, world):
    factory = session_factory(world.db_url)
    ctx, page, errors = open_page(browser, console, world.keys["sim-user-0"])
    try:
        with factory() as s:
            uid = s.scalar(select(User.id).where(User.name == "sim-user-0"))
            mine = analytics.acceptance(s, utcnow() - timedelta(days=7), None, True, user_id=uid)
            everyone = analytics.acceptance(s, utcnow() - timedelta(days=7), None, True)
        assert "your completions (sim-user-0)" in page.inner_text("main")
        served = sum(int(t.replace(",", "")) for t in page.locator("#acceptance-week td.served").all_inner_texts())
        assert served == sum(r["served"] for r in mine) < sum(r["served"] for r in everyone)

        page.goto(console + "/console/versions")
        assert page.locator("#version-ft-a").count() == 1
        assert page.locator("button.promote").count() == 0 and page.locator("#audit").count() == 0
        # Posting the action anyway, with the browser's cookie and with a Bearer header: the server refuses.
        r = page.request.post(console + "/console/versions/ft-a/rollout", form={"to": "all", "confirm": "yes"})
        assert r.status == 403 and "needs a staff key" in r.text()
        r = httpx.post(console + "/console/versions/ft-a/rollout", data={"to": "all", "confirm": "yes"},
                       headers={"Authorization": f"Bearer {world.keys['nobody']}"})
        assert r.status_code == 403
        assert httpx.get(console + "/console/versions/ft-a/rollout?to=all",
                         headers={"Authorization": f"Bearer {world.keys['nobody']}"}).status_code == 403
        with factory() as s:
            assert store.get_version(s, "ft-a").rollout_state == RolloutState.ab
            assert s.scalar(select(AuditEvent.id)) is None
        assert errors == []
    finally:
        ctx.close()


def test_bad_rollout_requests_are_4xx_naming_the_input(console, world):
    h = {"Authorization": f"Bearer {world.keys['staff']}"}

    class Unescaped:  # the error page HTML-escapes the message's quotes
        def __init__(self, r):
            self.status_code, self.text = r.status_code, html.unescape(r.text)

    get = lambda url, **kw: Unescaped(httpx.get(url, **kw))  # noqa: E731
    post = lambda url, **kw: Unescaped(httpx.post(url, **kw))  # noqa: E731
    r = get(console + "/console/versions/ft-a/rollout?to=sideways", headers=h)
    assert r.status_code == 400 and "to: bad rollout target 'sideways'" in r.text
    r = get(console + "/console/versions/nope/rollout?to=all", headers=h)
    assert r.status_code == 404 and "unknown model version 'nope'" in r.text
    r = post(console + "/console/versions/ft-a/rollout", data={"to": "all"}, headers=h)
    assert r.status_code == 400 and "confirm" in r.text
    r = post(console + "/console/versions/base/rollout", data={"to": "retired", "confirm": "yes"}, headers=h)
    assert r.status_code == 400 and "serving everyone" in r.text  # the store's own rule, unchanged
    r = get(console + "/console/versions", headers={"Authorization": "Bearer ollm-not-a-key"})
    assert r.status_code == 401
    r = post(console + "/console/login", data={"key": "ollm-not-a-key"})
    assert r.status_code == 401 and "not valid" in r.text
    r = get(console + "/console/training/bisect/nope", headers=h)
    assert r.status_code == 404


def test_staff_promotes_through_the_page_with_confirmation_and_an_audit_row(browser, console, world):
    factory = session_factory(world.db_url)
    ctx, page, errors = open_page(browser, console, world.keys["staff"])
    try:
        page.goto(console + "/console/versions")
        form = page.locator("#version-ft-a form.rollout").first
        form.locator("select[name=to]").select_option("all")
        form.locator("button.promote").click()
        assert "Move ft-a from ab:50 to all?" in page.inner_text("p.confirm")
        # The signed-in cookie alone cannot act: a post without the form's token (a forged form) is refused.
        r = page.request.post(console + "/console/versions/ft-a/rollout", form={"to": "all", "confirm": "yes"})
        assert r.status == 403 and "csrf" in r.text()
        with factory() as s:  # nothing changes before the confirmation
            assert store.get_version(s, "ft-a").rollout_state == RolloutState.ab
        page.click("button.confirm-yes")
        assert page.locator("p.done").inner_text() == "Done: ft-a: ab:50 → all"
        with factory() as s:
            assert store.get_version(s, "ft-a").rollout_state == RolloutState.all
            assert store.get_version(s, "base").rollout_state == RolloutState.staff
            assert store.running_experiment(s) is None
            audit = s.execute(select(AuditEvent, User.name).join(User, User.id == AuditEvent.user_id)).all()
        assert [(a.action, a.target, a.detail, name) for a, name in audit] == \
            [("promote", "ft-a", {"from": "ab:50", "to": "all", "via": "console"}, "console-staff")]
        assert "ft-a" in page.locator("#audit").inner_text()
        assert page.locator('#version-ft-a .state').inner_text() == "all"
        assert errors == []
    finally:
        ctx.close()


def test_every_page_works_with_an_empty_store_and_no_reports(browser, tmp_path):
    db = f"sqlite:///{tmp_path / 'empty.db'}"
    upgrade(db)
    with session_factory(db).begin() as s:
        key = store.create_key(s, "first-staff", staff=True)
    params = load_params(REPO / "params.yaml")
    params = params.model_copy(update={
        "tracking": params.tracking.model_copy(update={"reports_dir": str(tmp_path / "r")}),
        "train": params.train.model_copy(update={"reports_dir": str(tmp_path / "r" / "train")}),
        "bisect": params.bisect.model_copy(update={"out": str(tmp_path / "r" / "bisect")}),
        "data": params.data.model_copy(update={"stats": params.data.stats.model_copy(
            update={"out": str(tmp_path / "r" / "data")})})})
    app = create_app(ServeConfig(db_url=db), params=params)
    with live_server(app) as url:
        ctx, page, errors = open_page(browser, url, key)
        try:
            expected = {"/console": "No completions in the last day", "/console/versions": "No versions registered",
                        "/console/ab": "No experiments yet", "/console/loop": "loop.json yet",
                        "/console/training": "loss.csv yet", "/console/data": "stats.json yet"}
            for path, text in expected.items():
                resp = page.goto(url + path)
                assert resp.status == 200 and text in page.inner_text("main"), path
            # A loop report with several refresh rounds: a section per round and a chart across them.
            metric = {"base": 0.1, "delta": 0.05, "tolerance": 0.05, "ok": True}
            rounds = [{"round": i, "gate_passed": True, "parent": f"v{i}", "snapshot": {"sft": 10 * i},
                       "metrics": {"heldout.acceptance": {**metric, "tuned": 0.1 + 0.05 * i}}} for i in (1, 2, 3)]
            (tmp_path / "r").mkdir(exist_ok=True)
            (tmp_path / "r" / "loop.json").write_text(json.dumps({"rounds": rounds}))
            page.goto(url + "/console/loop")
            assert page.locator("section.round").count() == 3
            assert page.locator('#round-3 tr[data-metric="heldout.acceptance"] td').nth(2).inner_text() == "0.250"
            assert page.locator("#rounds-chart canvas").count() >= 1
            assert errors == []
        finally:
            ctx.close()


def test_vendored_uplot_is_the_version_pinned_in_package_lock():
    lock = json.loads((REPO / "package-lock.json").read_text())
    pinned = lock["packages"]["node_modules/uplot"]["version"]
    banner = (REPO / "feedback/console/static/vendor/uPlot.iife.min.js").read_text()[:80]
    assert re.search(r"\(v([\d.]+)\)", banner).group(1) == pinned


def test_pages_on_each_database_match_the_report(empty_db_url):
    """SQLite and PostgreSQL: a store filled through its tables (as the benchmark does), every page served,
    the Overview's week equal to `acceptance` over the same window, users per arm equal to the routed users."""
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_console import fill

    key = fill(empty_db_url, 3000, seed=1)
    app = create_app(ServeConfig(db_url=empty_db_url))
    with live_server(app) as url, httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}) as c:
        pages = {p: c.get(p) for p in PAGES}
        assert {p: r.status_code for p, r in pages.items()} == {p: 200 for p in PAGES}
        with session_factory(empty_db_url)() as s:
            week = analytics.acceptance(s, utcnow() - timedelta(days=7), None, True)
            assert sum(r["ignored"] for r in week) > 0  # the fill's viewed-and-undecided completions
            exp = store.running_experiment(s)
            users = s.execute(select(func.count(func.distinct(Completion.user_id)))
                              .where(Completion.experiment_id == exp.id)).scalar()
        text = html.unescape(pages["/console"].text)
        for r in week:
            row = re.search(rf'<tr data-model="{r["model"]}" data-language="{r["language"]}">(.*?)</tr>',
                            text.split('id="acceptance-week"')[1], re.S).group(1)
            assert re.findall(r'<td class="n \w+">([^<]*)</td>', row)[:6] == \
                [f"{r['served']:,}", f"{r['shown']:,}", f"{r['accepted']:,}", f"{r['rejected']:,}", f"{r['ignored']:,}",
                 fmt(r["rate"])]
        arm_users = [int(u) for u in re.findall(r'<td class="n users">([\d,]+)</td>', pages["/console/ab"].text)]
        assert sum(arm_users) >= users > 0  # a user can be in both arms' rows only if routed to both
    app.state.engine.dispose()


def test_screenshots_tool_writes_every_page_and_revokes_its_key(browser, world, tmp_path):
    from PIL import Image

    from feedback.console.screenshots import PAGES as SHOTS
    from feedback.console.screenshots import SCREENSHOT_USER, take
    from feedback.models import ApiKey

    written = take(str(world.params_path), world.db_url, tmp_path / "shots", 1280, 900, browser=browser)
    assert sorted(p.name for p in written) == sorted(f"{name}.png" for name in SHOTS)
    for p in written:
        with Image.open(p) as im:
            assert im.width == 1280 and im.height >= 900  # the fixed viewport, full page
    with session_factory(world.db_url)() as s:
        keys = s.scalars(select(ApiKey).join(User).where(User.name == SCREENSHOT_USER)).all()
    assert keys and all(k.revoked_at is not None for k in keys)
