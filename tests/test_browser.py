"""What a user looks at, in a real headless Chromium (Debian's, driven by Playwright; scripts/setup.sh
--test installs it): the HTML report of a run, and the Prefect UI served by `curate ui` with a flow
served by `curate serve` — find the deployment and its schedule, start a run with the UI's Quick run,
and see the run's artifacts. Screenshots go to the test's temp dir (kept after a failure)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, write_flow
from curate.config import load_flow
from curate.pipeline import execute

pytest.importorskip("playwright")


def test_html_report_shows_its_plots_counts_and_export_links(browser, tmp_path, shared_store):
    flow = write_flow(tmp_path, name="report", base_dir=str(ROOT), output_dir=str(tmp_path / "out"), store_dir=str(shared_store),
                      inputs=[{"path": "data/sample/cherry_alpaca.jsonl", "limit": 12}, {"path": "data/sample/code_alpaca.csv", "limit": 8}],
                      score=[{"method": "heuristic"}], embed={"model": "all-MiniLM-L6-v2", "batch_size": 32},
                      select=[{"method": "threshold", "score": "heuristic.response_tokens", "min": 3}, {"method": "kcenter", "budget": 6}],
                      export={"layouts": ["messages", "alpaca"], "file_types": ["jsonl"]})
    summary = execute(load_flow(flow))
    report = tmp_path / "out" / "report" / "report.html"
    html = report.read_text()
    assert "src=\"data:image/png;base64," in html and "outcomes.png" not in html  # self-contained: plots inlined
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(report.as_uri())
    page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    sizes = page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
    assert len(sizes) >= 3 and all(ok and w > 0 and h > 0 for ok, w, h in sizes), sizes  # every image rendered
    for alt in ("outcomes", "embedding map by outcome", "embedding map by source", "heuristic.response_tokens"):
        assert page.locator(f'img[alt="{alt}"]').count() == 1, alt  # outcome counts, maps by outcome and source, score histograms
    body = page.inner_text("body")
    c = summary["counts"]
    assert f"{summary['n_input']} input rows → {c['selected']} selected, {c['not_selected']} not selected, {c['filtered']} filtered" in body
    outcomes = page.locator("h2", has_text="Outcomes").locator("xpath=following-sibling::table[1]")
    rows = outcomes.locator("tbody tr").all_inner_texts()
    assert sum(int(r.split("\t")[-1]) for r in rows) == summary["n_input"]  # the outcomes table holds every input row
    header = outcomes.locator("th", has_text="rows")
    header.click()  # sortable: ascending by the number of rows
    counts = [int(r.split("\t")[-1]) for r in outcomes.locator("tbody tr").all_inner_texts()]
    assert counts == sorted(counts) and "sorted-asc" in header.get_attribute("class")
    header.click()
    assert [int(r.split("\t")[-1]) for r in outcomes.locator("tbody tr").all_inner_texts()] == sorted(counts, reverse=True)
    links = page.eval_on_selector_all("a", "as => as.map(a => a.getAttribute('href'))")
    assert len(links) == 2 and all((report.parent / href).resolve().exists() for href in links), links
    page.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.prefect
def test_prefect_ui_shows_the_served_deployment_runs_it_and_its_artifacts(browser, tmp_path):
    import httpx
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    port = _free_port()
    home = tmp_path / "prefect-home"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    env.pop("PREFECT_API_URL", None)
    curate = [sys.executable, "-m", "curate.cli"]
    flow = write_flow(tmp_path, name="nightly", base_dir=str(ROOT), output_dir=str(tmp_path / "out"), store_dir=str(tmp_path / "store"),
                      inputs=[{"path": "data/sample/cherry_alpaca.jsonl", "limit": 6}], score=[{"method": "heuristic"}],
                      select=[{"method": "top_k", "score": "heuristic.response_tokens", "budget": 3}],
                      export={"layouts": ["messages"], "file_types": ["jsonl"]}, report={"plots": False},
                      runtime={"prefect": True, "torch_threads": 1, "progress": False})
    started = subprocess.run([*curate, "ui", "--port", str(port)], env=env, capture_output=True, text=True, timeout=300)
    assert started.returncode == 0, started.stdout + started.stderr
    base = f"http://127.0.0.1:{port}"
    assert base in started.stdout
    served = subprocess.Popen([*curate, "serve", str(flow), "--cron", "0 3 * * *", "--timezone", "Europe/Berlin"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    shot = lambda name: page.screenshot(path=str(tmp_path / f"{name}.png"), full_page=True)  # noqa: E731
    try:
        deadline = time.monotonic() + 120
        while not httpx.post(f"{base}/api/deployments/filter", json={}).json():  # `curate ui` set the profile: serve registers there
            assert served.poll() is None and time.monotonic() < deadline, served.stdout.read() if served.poll() is not None else "no deployment"
            time.sleep(1)
        page.goto(f"{base}/deployments")
        page.get_by_role("link", name="nightly").first.click()
        page.get_by_text("At 03:00 AM every day").first.wait_for(timeout=30_000)
        shot("1-deployment")
        page.get_by_role("button", name="Run", exact=True).click()
        # runs not made by the schedule (it adds its upcoming runs, auto_scheduled, whenever it likes)
        runs = lambda: {r["id"] for r in httpx.post(f"{base}/api/flow_runs/filter", json={}).json() if not r["auto_scheduled"]}  # noqa: E731
        before = runs()
        page.locator("button.p-overflow-menu-item", has_text="Quick run").click()
        confirm = page.get_by_role("dialog").get_by_role("button", name="Run", exact=True)
        confirm.wait_for(timeout=30_000)
        page.wait_for_timeout(500)  # the dialog animates in; a click during it can miss (seen once in a full suite)
        confirm.click()
        # the run the click made, from the API (the toast announcing it can come and go unseen on a busy machine)
        deadline, retry = time.monotonic() + 120, time.monotonic() + 30
        while not (new := runs() - before):
            assert time.monotonic() < deadline, "the quick run made no flow run"
            if time.monotonic() > retry and confirm.is_visible():  # the dialog is still open: the click did not land
                confirm.click()
                retry = time.monotonic() + 30
            time.sleep(1)
        assert len(new) == 1, new
        (run_id,) = new
        view = page.get_by_role("button", name="View run").first  # the toast that announces it
        try:
            view.wait_for(timeout=20_000)
            shot("2-quick-run")
            page.wait_for_timeout(1000)  # the toast slides in; a click during the animation misses it
            view.click(force=True)
            page.wait_for_url(re.compile(r".*/runs/flow-run/[0-9a-f-]+"), timeout=30_000)
            assert run_id in page.url
        except PlaywrightTimeout:
            shot("2-quick-run-no-toast")
        href = f"/runs/flow-run/{run_id}"
        deadline = time.monotonic() + 240
        while (state := httpx.get(f"{base}/api/flow_runs/{run_id}").json()["state"]["type"]) not in ("COMPLETED", "FAILED", "CRASHED"):
            assert time.monotonic() < deadline, f"the run is still {state}"
            time.sleep(2)
        assert state == "COMPLETED", state
        page.goto(f"{base}{href}")
        page.get_by_text("Artifacts", exact=True).first.click()
        page.get_by_text("curate-summary-nightly").first.wait_for(timeout=30_000)
        page.get_by_text("curate-counts-nightly").first.wait_for(timeout=30_000)
        page.get_by_text("curate-report-nightly").first.wait_for(timeout=30_000)
        shot("3-run-artifacts")
        summary = json.loads((tmp_path / "out" / "latest" / "run.json").read_text())
        assert summary["flow_run_id"] == run_id and summary["counts"]["selected"] == 3
    finally:
        page.close()
        served.terminate()
        served.wait(timeout=60)
        subprocess.run([*curate, "ui", "--stop"], env=env, capture_output=True, timeout=120)
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{base}/api/health", timeout=5)
