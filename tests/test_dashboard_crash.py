"""The dashboard's crash banner: a restarted hub says when it crashed, why, and what it held back."""

from __future__ import annotations

from typing import Any

from mlx_hub.core.status import CrashReport, Supervision

from .helpers import LiveController
from .test_dashboard import INJECTED, browser_needed, live, page  # noqa: F401 (fixtures)


@browser_needed
async def test_a_restarted_hub_shows_its_last_crash(page: Any, live: LiveController) -> None:  # noqa: F811
    crash = CrashReport(
        at=1_700_000_000.0,
        pid=4242,
        exit_code=None,
        signal="SIGSEGV",
        cause="killed by SIGSEGV while beta loading",
        loading=["beta"],
        generating=[],
        blamed={"beta": "loading"},
        held_back={"beta": "crashed the hub while loading (twice in a row)"},
        log_tail=["2026-12-02 INFO mlx_hub.hub: model 'beta' serving", INJECTED],
        uptime_seconds=3.0,
    )
    live.hub.supervision = Supervision(supervisor_pid=1, restarts=2, last_crash=crash)
    await page.goto(f"{live.url}/hub/")
    banner = page.locator("#crash-banner")
    await banner.wait_for(state="visible", timeout=10_000)
    text = await banner.inner_text()
    assert "crashed and was restarted (2 restarts so far)" in text
    assert "killed by SIGSEGV while beta loading" in text
    assert "Not loaded again: beta (crashed the hub while loading (twice in a row))" in text
    assert INJECTED in await page.locator("#crash-log").text_content()  # log lines are text, never markup
    assert await page.evaluate("window.__xss") is None

    live.hub.supervision = None  # a hub that never crashed shows no banner
    await page.locator("#btn-refresh").click()
    await banner.wait_for(state="hidden", timeout=10_000)
    assert page.errors == []
