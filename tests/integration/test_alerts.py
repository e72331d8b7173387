"""Alerting with the real tools: Debian's `prometheus` scrapes the real server's /metrics with a bearer API key and
loads the shipped rules file, and Debian's `prometheus-alertmanager` receives the appliance's own alerts: nothing
under normal traffic, and a stalled worker (SIGSTOP while a request streams and another waits) within 60 s.

Both tools run as subprocesses on free ports with temp configs, and stop with the module."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from appliance.resources import CHECKOUT
from tests.server import DEFAULT_MODEL, NO_EOS, Running, appliance, free_port, new_key, wait_until

PROMPT = [{"role": "user", "content": "Count from one to one hundred in words, one number per line."}]
STALL_DEADLINE = 60.0




class Tool:
    """A Debian tool as a subprocess, stopped on exit; its output kept for a failure's message."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])

    def alive(self) -> None:
        assert self.proc.poll() is None, f"{self.log.name} exited {self.proc.returncode}:\n{self.tail()}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} not found: install Debian's package (apt-get install prometheus prometheus-alertmanager; "
                    "./install.sh --test does it)")


@pytest.fixture(scope="module")
def alertmanager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    need("prometheus-alertmanager")
    folder = tmp_path_factory.mktemp("alertmanager")
    (folder / "alertmanager.yml").write_text("route:\n  receiver: nobody\nreceivers:\n  - name: nobody\n")
    port = free_port()
    tool = Tool(["prometheus-alertmanager", f"--config.file={folder / 'alertmanager.yml'}",
                 f"--storage.path={folder / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                 "--cluster.listen-address="], folder / "alertmanager.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(url + "/-/ready", timeout=2).status_code == 200, "Alertmanager ready", 60)
        yield url
    finally:
        tool.stop()


@pytest.fixture(scope="module")
def watched(start_server: Callable[..., Running], alertmanager: str) -> Running:
    """A server with the shipped rules and default intervals, sending to the Alertmanager; an auditor key (the
    role with metrics:read and nothing to change) in the data dir's parent for Prometheus."""

    def auditor_key(data: Path) -> None:
        (data.parent / "prometheus.key").write_text(new_key(data, role="auditor"))

    return start_server({"APPLIANCE_ALERTS__ALERTMANAGER_URL": alertmanager}, prepare=auditor_key)


def am_alerts(alertmanager: str) -> list[dict[str, Any]]:
    reply = httpx.get(alertmanager + "/api/v2/alerts", params={"active": "true"}, timeout=5)
    reply.raise_for_status()
    return reply.json()  # type: ignore[no-any-return]


def listing(server: Running) -> dict[str, Any]:
    reply = httpx.get(server.url + "/api/alerts", headers=server.headers, timeout=30)
    assert reply.status_code == 200, reply.text
    return reply.json()  # type: ignore[no-any-return]


def evaluated_after(server: Running, moment: float) -> dict[str, Any] | None:
    """The alerts listing once the server has evaluated its rules after `moment` (a Unix time)."""
    current = listing(server)
    at = current["evaluated_at"]
    if at and datetime.fromisoformat(at.replace("Z", "+00:00")).timestamp() > moment:
        return current
    return None


def test_prometheus_scrapes_metrics_with_a_bearer_key_and_loads_the_rules(watched: Running,
                                                                           tmp_path: Path) -> None:
    need("prometheus")
    assert watched.process is not None
    key_file = watched.process.data_dir.parent / "prometheus.key"
    target = watched.url.removeprefix("http://")
    rules = CHECKOUT / "deploy" / "prometheus" / "appliance-rules.yml"
    (tmp_path / "prometheus.yml").write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": [{"job_name": "appliance", "metrics_path": "/metrics", "static_configs": [
            {"targets": [target]}], "authorization": {"type": "Bearer", "credentials_file": str(key_file)}}]}))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    tool = Tool(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                 f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                tmp_path / "prometheus.log")
    try:
        wait_until(lambda: httpx.get(url + "/-/ready", timeout=2).status_code == 200, "Prometheus ready", 60)

        def scraped() -> dict[str, Any] | None:
            tool.alive()
            targets = httpx.get(url + "/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
            return next((t for t in targets if t["health"] == "up"), None)

        up = wait_until(scraped, "a successful scrape", 60)
        assert up["scrapeUrl"] == f"{watched.url}/metrics" and up["lastError"] == ""

        def query(expr: str) -> list[dict[str, Any]]:
            reply = httpx.get(url + "/api/v1/query", params={"query": expr}, timeout=10).json()
            assert reply["status"] == "success", (expr, reply)
            return reply["data"]["result"]  # type: ignore[no-any-return]

        series = wait_until(lambda: query(f'appliance_worker_up{{worker="{DEFAULT_MODEL}@1"}}'),
                          "the worker_up series", 30)
        assert series[0]["value"][1] == "1" and series[0]["metric"]["job"] == "appliance"
        assert query('up{job="appliance"}')[0]["value"][1] == "1"
        # every panel of the shipped Grafana dashboard is a query Prometheus accepts
        dashboard = json.loads((CHECKOUT / "deploy" / "grafana" / "appliance.json").read_text())
        for panel in dashboard["panels"]:
            for target_query in panel.get("targets", []):
                query(target_query["expr"].replace("$model", ".*"))
        groups = httpx.get(url + "/api/v1/rules", timeout=5).json()["data"]["groups"]
        loaded = [rule for group in groups for rule in group["rules"]]
        assert len(loaded) == rules.read_text().count("- alert:") and all(r["health"] != "err" for r in loaded)
        tool.alive()
    finally:
        tool.stop()


def test_normal_traffic_raises_no_alert(watched: Running, alertmanager: str) -> None:
    client = watched.client()
    for i in range(3):
        reply = client.chat.completions.create(model=DEFAULT_MODEL, messages=PROMPT, max_tokens=24,
                                               temperature=0.7, seed=i)
        assert reply.choices[0].message.content
        stream = client.chat.completions.create(model=DEFAULT_MODEL, messages=PROMPT, max_tokens=24, stream=True,
                                                temperature=0.7, seed=10 + i)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    done = time.time()
    after = wait_until(lambda: evaluated_after(watched, done), "an evaluation after the traffic", 40)
    # nothing fires (pending is not raised: it is neither sent nor audited; a box loaded by other work may see a
    # slow first token pending for a while)
    assert [a for a in after["alerts"] if a["state"] == "firing"] == [], after
    print("pending after normal traffic:", [(a["name"], a["value"]) for a in after["alerts"]])
    assert am_alerts(alertmanager) == []
    dashboard = httpx.get(watched.url + "/api/dashboard", headers=watched.headers, timeout=30).json()
    assert [a for a in dashboard["alerts"] if a["state"] == "firing"] == []


def test_a_stalled_worker_reaches_alertmanager_within_60_s(watched: Running, alertmanager: str) -> None:
    assert watched.process is not None
    [worker] = watched.process.workers()
    outcomes: list[object] = []

    def request(max_tokens: int) -> None:
        try:
            with httpx.stream("POST", watched.url + "/v1/chat/completions", headers=watched.headers, timeout=180,
                              json={"model": DEFAULT_MODEL, "messages": PROMPT, "max_tokens": max_tokens,
                                    "stream": True, "logit_bias": NO_EOS}) as reply:  # streams until stalled
                for _ in reply.iter_bytes():
                    pass
                outcomes.append(reply.status_code)
        except httpx.HTTPError as exc:
            outcomes.append(exc)

    chunks = _streamed_chunks(watched)
    streaming = threading.Thread(target=request, args=(2000,), daemon=True)
    streaming.start()
    wait_until(lambda: outcomes or _streamed_chunks(watched) > chunks + 2, "the request streaming", 120)
    assert not outcomes, outcomes  # still streaming
    queued = threading.Thread(target=request, args=(8,), daemon=True)
    worker.suspend()  # SIGSTOP: alive, answering nothing, as a deadlocked worker
    stalled_at = time.monotonic()
    queued.start()
    try:
        def stall_alert() -> dict[str, Any] | None:
            return next((a for a in am_alerts(alertmanager)
                         if a["labels"]["alertname"] in ("WorkerStalled", "WorkerRestarted")), None)

        alert = wait_until(stall_alert, "a stalled-worker alert in Alertmanager", STALL_DEADLINE)
        took = time.monotonic() - stalled_at
        assert took < STALL_DEADLINE
        labels = alert["labels"]
        assert labels["severity"] == "critical"
        assert labels.get("worker", labels.get("model", "")).startswith(DEFAULT_MODEL), labels
        assert alert["status"]["state"] == "active" and alert["generatorURL"].endswith("/ui/#/dashboard")
        assert alert["annotations"]["summary"]
        # the same alert, with the same fingerprint, in the API, the dashboard, the CLI and the audit log
        ours = {a["fingerprint"]: a for a in listing(watched)["alerts"]}
        assert alert["fingerprint"] in ours and ours[alert["fingerprint"]]["state"] == "firing"
        dashboard = httpx.get(watched.url + "/api/dashboard", headers=watched.headers, timeout=30).json()
        assert alert["fingerprint"] in {a["fingerprint"] for a in dashboard["alerts"]}
        listed = appliance("alerts", "list", data_dir=watched.process.data_dir).stdout
        assert "firing" in listed and labels["alertname"] in listed
        records = json.loads(appliance("alerts", "list", "--json", data_dir=watched.process.data_dir).stdout)
        assert records["alerts"]
        audited = [json.loads(line) for line in appliance("audit", "export", "--action", "alert.firing",
                                                          data_dir=watched.process.data_dir).stdout.splitlines()]
        assert any(r["target"] == labels["alertname"] and r["details"]["labels"] == labels for r in audited)
        print(f"stall alert {labels['alertname']} in Alertmanager after {took:.1f} s")
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            worker.resume()  # SIGCONT (the supervisor may have replaced it already)
        streaming.join(120)
        queued.join(120)


def _streamed_chunks(server: Running) -> float:
    text = httpx.get(server.url + "/metrics", headers=server.headers, timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("appliance_inter_token_latency_seconds_count"))


def test_resolved_after_the_worker_is_replaced(watched: Running, alertmanager: str) -> None:
    """Once the supervisor replaced the stalled worker and requests are served again, WorkerStalled is resolved
    (WorkerRestarted stays for its 10-minute window, as its rule says)."""
    client = watched.client()
    reply = wait_until(lambda: _chat(client), "a served request after the stall", 120)
    assert reply
    done = time.time()
    after = wait_until(lambda: evaluated_after(watched, done), "an evaluation after recovery", 40)
    assert "WorkerStalled" not in {a["name"] for a in after["alerts"] if a["state"] == "firing"}


def _chat(client: Any) -> str | None:
    try:
        reply = client.chat.completions.create(model=DEFAULT_MODEL, messages=PROMPT, max_tokens=4, temperature=0)
        return reply.choices[0].message.content  # type: ignore[no-any-return]
    except Exception:
        return None
