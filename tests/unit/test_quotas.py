"""Quotas against a real SQLite database and a hand-driven clock: rpm, tpm with settlement, the daily budget,
unlimited keys, restarts, concurrency, and the limits carried from a key to its principal."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from datetime import UTC, datetime

import pytest

from appliance.auth.keys import ApiKeyService, derive_pepper
from appliance.auth.quotas import (
    DEFAULT_MAX_TOKENS,
    UNLIMITED,
    Limits,
    QuotaService,
    estimate_prompt_tokens,
    estimate_tokens,
    format_reset,
)
from appliance.cli import build_parser
from appliance.datadir import DataDir
from appliance.errors import InvalidRequest, RateLimited

KEY = "key:abc"
# 2026-11-23 12:00:00 UTC: noon, far from a day boundary unless a test moves there
NOON = datetime(2026, 11, 23, 12, tzinfo=UTC).timestamp()


class Clock:
    def __init__(self, now: float = NOON) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def quotas(conn: sqlite3.Connection, clock: Clock) -> QuotaService:
    return QuotaService(conn, clock=clock)


def refused(quotas: QuotaService, limits: Limits, tokens: int) -> RateLimited:
    with pytest.raises(RateLimited) as caught:
        quotas.reserve(KEY, limits, tokens)
    return caught.value


def test_rpm_refuses_the_request_over_the_limit_with_the_exact_wait(quotas: QuotaService, clock: Clock) -> None:
    limits = Limits(rpm=2)
    first = quotas.reserve(KEY, limits, 10)
    assert first.status.requests is not None and first.status.requests.remaining == 1
    quotas.reserve(KEY, limits, 10)
    error = refused(quotas, limits, 10)
    assert error.limit == "rpm" and error.retry_after == pytest.approx(30.0)  # one request drains in 60/2 s
    assert error.status_code == 429 and error.code == "rate_limit_exceeded" and error.error_type == "requests"
    assert "2 requests per minute (rpm)" in error.message and "retry in 30 s" in error.message
    headers = error.headers()
    assert headers["retry-after"] == "30"
    assert headers["x-ratelimit-limit-requests"] == "2" and headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"] == "1m0s"
    clock.now += 20
    assert refused(quotas, limits, 10).retry_after == pytest.approx(10.0)
    clock.now += 10
    quotas.reserve(KEY, limits, 10)


def test_tpm_reserves_the_estimate_and_settlement_gives_back_the_difference(quotas: QuotaService,
                                                                          clock: Clock) -> None:
    limits = Limits(tpm=1000)
    big = quotas.reserve(KEY, limits, 900)  # e.g. a short prompt with max_tokens=880
    error = refused(quotas, limits, 200)
    assert error.limit == "tpm" and error.error_type == "tokens"
    assert error.retry_after == pytest.approx(6.0)  # 100 tokens over, draining 1000/60 a second
    assert "100 left" in error.message and "needs about 200" in error.message
    quotas.settle(big, 40)  # it really used 40
    assert big.status.tokens is not None and big.status.tokens.remaining == 960
    second = quotas.reserve(KEY, limits, 200)
    assert second.status.tokens is not None and second.status.tokens.remaining == 760
    quotas.settle(big, 900)  # settling twice does nothing
    assert quotas.status(KEY, limits).tokens == second.status.tokens


def test_usage_over_the_estimate_leaves_a_debt_that_delays_the_next_request(quotas: QuotaService) -> None:
    limits = Limits(tpm=600)
    reservation = quotas.reserve(KEY, limits, 100)
    quotas.settle(reservation, 900)  # no max_tokens: the model went on well past the default allowance
    status = quotas.status(KEY, limits)
    assert status.tokens is not None and status.tokens.remaining == 0 and status.tokens.reset == pytest.approx(90)
    assert refused(quotas, limits, 60).retry_after == pytest.approx(36.0)  # (900 + 60 - 600) tokens at 10/s


def test_a_request_larger_than_the_limit_is_refused_without_a_wait(quotas: QuotaService) -> None:
    for limits, name in ((Limits(tpm=100), "tpm"), (Limits(daily_tokens=100), "daily_tokens")):
        error = refused(quotas, limits, 101)
        assert error.limit == name and error.retry_after is None
        assert "waiting will not help" in error.message and "lower max_tokens" in error.message
        assert error.headers()["x-should-retry"] == "false" and "retry-after" not in error.headers()


def test_daily_budget_renews_at_midnight_utc(quotas: QuotaService, clock: Clock) -> None:
    limits = Limits(daily_tokens=1000)
    clock.now = datetime(2026, 11, 23, 23, tzinfo=UTC).timestamp()
    quotas.settle(quotas.reserve(KEY, limits, 700), 600)
    status = quotas.status(KEY, limits)
    assert status.day is not None and status.day.remaining == 400 and status.day.reset == pytest.approx(3600)
    assert status.headers()["x-ratelimit-reset-tokens-day"] == "1h0m0s"
    late = quotas.reserve(KEY, limits, 300)
    error = refused(quotas, limits, 200)
    assert error.limit == "daily_tokens" and error.retry_after == pytest.approx(3600)
    assert "00:00 UTC, in 1h0m0s" in error.message
    clock.now += 3600
    fresh = quotas.reserve(KEY, limits, 200)
    quotas.settle(late, 300)  # reserved yesterday: settles against yesterday, not today's count
    assert fresh.status.day is not None and fresh.status.day.remaining == 800
    assert quotas.status(KEY, limits).day == fresh.status.day


def test_release_gives_back_the_request_and_its_tokens(quotas: QuotaService) -> None:
    limits = Limits(rpm=1, tpm=500, daily_tokens=10_000)
    quotas.release(quotas.reserve(KEY, limits, 500))  # e.g. the worker said context_length_exceeded
    reservation = quotas.reserve(KEY, limits, 500)
    assert reservation.status.day is not None and reservation.status.day.remaining == 9_500


def test_the_tightest_limit_names_the_refusal_and_sets_the_wait(quotas: QuotaService) -> None:
    limits = Limits(rpm=60, tpm=100)
    quotas.reserve(KEY, limits, 90)
    error = refused(quotas, limits, 50)  # rpm has room; tpm is 40 over at 100/60 a second
    assert error.limit == "tpm" and error.retry_after == pytest.approx(24.0)


def test_unlimited_subjects_are_untouched(quotas: QuotaService, conn: sqlite3.Connection) -> None:
    for _ in range(1000):
        reservation = quotas.reserve(KEY, UNLIMITED, 10**9)
        quotas.settle(reservation, 10**9)
    assert reservation.status.headers() == {} and quotas.status(KEY, UNLIMITED).headers() == {}
    assert conn.execute("SELECT count(*) FROM quota_usage").fetchone()[0] == 0


def test_usage_survives_a_restart_and_drains_across_the_downtime(data: DataDir, quotas: QuotaService,
                                                                 clock: Clock) -> None:
    limits = Limits(rpm=2, tpm=1000, daily_tokens=5000)
    quotas.settle(quotas.reserve(KEY, limits, 400), 300)
    quotas.settle(quotas.reserve(KEY, limits, 400), 300)
    clock.now += 15  # the server is down for 15 s: half a request and 250 tokens drain meanwhile
    with contextlib.closing(data.connect()) as other:
        restarted = QuotaService(other, clock=clock)
        status = restarted.status(KEY, limits)
        assert status.requests is not None and status.requests.reset == pytest.approx(45)
        assert status.tokens is not None and status.tokens.remaining == 650
        assert status.day is not None and status.day.remaining == 4400
        error = refused(restarted, limits, 10)
        assert error.limit == "rpm" and error.retry_after == pytest.approx(15)


def test_concurrent_reservations_never_overspend(quotas: QuotaService) -> None:
    limits = Limits(tpm=1000, daily_tokens=10**6)
    granted: list[int] = []
    start = threading.Barrier(8)

    def spend() -> None:
        start.wait()
        for _ in range(40):
            with contextlib.suppress(RateLimited):
                quotas.reserve(KEY, limits, 10)
                granted.append(1)

    threads = [threading.Thread(target=spend) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(granted) == 100  # the clock stands still: exactly 1000 tokens, never 1010
    status = quotas.status(KEY, limits)
    assert status.day is not None and status.day.remaining == 10**6 - 1000


def test_estimates_err_high_for_english_and_default_the_completion() -> None:
    prompt = estimate_prompt_tokens(["What is the capital of France?"], 1)
    assert prompt == 10 + 8
    assert estimate_prompt_tokens(["héllo"], 0) == 2  # six UTF-8 bytes
    assert estimate_tokens(prompt, None) == prompt + DEFAULT_MAX_TOKENS
    assert estimate_tokens(prompt, 5) == prompt + 5


@pytest.mark.parametrize(("seconds", "text"), [(0, "0s"), (0.0123, "13ms"), (1.0, "1s"), (2.46, "2.5s"),
                                              (60, "1m0s"), (90.2, "1m31s"), (3600, "1h0m0s")])
def test_reset_times_are_written_as_openai_does(seconds: float, text: str) -> None:
    assert format_reset(seconds) == text


def test_keys_carry_their_limits_into_the_principal(data: DataDir, conn: sqlite3.Connection) -> None:
    keys = ApiKeyService(conn, derive_pepper(data.read_master_key()))
    record, secret = keys.create("metered", "user", limits=Limits(rpm=5, daily_tokens=1000))
    assert (record.rpm, record.tpm, record.daily_tokens) == (5, None, 1000)
    principal = keys.authenticate(f"Bearer {secret}")
    assert principal.limits == Limits(rpm=5, daily_tokens=1000) and principal.subject == f"key:{record.id}"
    _, free = keys.create("free", "user")
    assert keys.authenticate(f"Bearer {free}").limits.unlimited
    with pytest.raises(InvalidRequest, match="tpm must be a positive"):
        keys.create("bad", "user", limits=Limits(tpm=0))


@pytest.mark.parametrize("value", ["0", "-3", "ten", "1.5"])
def test_cli_limits_must_be_positive_whole_numbers(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["keys", "create", "--name", "n", "--role", "user", "--daily-tokens", value])
    assert "positive whole number" in capsys.readouterr().err
