"""Token-aware quotas (DESIGN section 2, step 5): requests per minute, tokens per minute and a token budget per UTC
day, for a subject: an API key (`key:<id>`) or a user (`user:<id>`). No HTTP in here. A request may spend on more
than one subject (a user's own key: the key's limits and its owner's); `reserve_all` takes from each or from none.

Minute limits are leaky buckets (GCRA, the scheme of nginx's `limit_req`), one per subject and limit: the bucket
holds what the subject has used and drains at limit/60 per second; a request is admitted when its cost fits under
the limit. Fixed minute windows let a client spend twice its limit across a boundary; a bucket does not, keeps two
numbers per subject, and gives an exact wait: (level + cost - limit) / drain rate. A full bucket is empty again
after one minute. The daily budget is a plain counter for the current UTC day, reset at 00:00 UTC.

Reserve, then settle. Before a request `reserve` takes one request and an estimate of its tokens, or raises
`RateLimited` with the wait. Afterwards `settle` replaces the estimate with the real usage: a smaller one gives
capacity back, a larger one leaves the bucket in debt, so the next request waits longer (no request is cut short).
`release` returns the request and its tokens when it failed without generating anything. A request reserved
before midnight UTC is settled against the day it started on.

Estimates (`estimate_prompt_tokens`, `estimate_tokens`): the gateway has no tokenizer, so a prompt counts as
ceil(UTF-8 bytes / 3) tokens plus 8 per chat message for the template's role markers. BPE tokenizers average about
4 bytes a token on English and code, so this errs high for Latin scripts and can be low for CJK or for a template
that adds its own system prompt; settlement makes either exact. A request without max_tokens reserves 256
completion tokens (the worker may go on to the end of the context; settlement then charges what it generated).

State: memory is authoritative on the request path (one lock, no awaits, no reads after a subject's first use);
every change is written through to the `quota_usage` table with one UPSERT, and a subject's row is read back the
first time it is seen after a start, so usage survives a restart. Levels are stored with the wall-clock time they
were measured at and drain across the downtime.
"""

from __future__ import annotations

import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import date

import msgspec

from appliance.errors import RateLimited
from appliance.logs import get_logger

log = get_logger(__name__)

BYTES_PER_TOKEN = 3
MESSAGE_OVERHEAD_TOKENS = 8
DEFAULT_MAX_TOKENS = 256
DAY_SECONDS = 86_400
_EPSILON = 1e-9  # float drift must not refuse a request that exactly fits


class Limits(msgspec.Struct, frozen=True):
    """A subject's limits; None is unlimited."""

    rpm: int | None = None
    tpm: int | None = None
    daily_tokens: int | None = None

    @property
    def unlimited(self) -> bool:
        return self.rpm is None and self.tpm is None and self.daily_tokens is None


UNLIMITED = Limits()


def estimate_prompt_tokens(texts: Iterable[str], messages: int) -> int:
    """An upper-ish estimate of a prompt's tokens without a tokenizer (see the module docstring)."""
    prompt_bytes = sum(len(text.encode()) for text in texts)
    return -(-prompt_bytes // BYTES_PER_TOKEN) + MESSAGE_OVERHEAD_TOKENS * messages


def estimate_tokens(prompt_tokens: int, max_tokens: int | None) -> int:
    """What a request may spend: its prompt plus max_tokens, or DEFAULT_MAX_TOKENS when it names none."""
    return prompt_tokens + (max_tokens if max_tokens is not None else DEFAULT_MAX_TOKENS)


def format_reset(seconds: float) -> str:
    """A wait as OpenAI writes it in `x-ratelimit-reset-*`: 250ms, 1.5s, 6m0s, 3h12m5s."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    if seconds < 60:
        return f"{seconds:.1f}".removesuffix(".0") + "s"
    minutes, secs = divmod(math.ceil(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return (f"{hours}h" if hours else "") + f"{minutes}m{secs}s"


@dataclass(frozen=True)
class Window:
    """One limit as it stands now."""

    limit: int
    remaining: int
    reset: float  # seconds until it is back to its full allowance


@dataclass(frozen=True)
class QuotaStatus:
    """A subject's limits as they stand now; `headers` are OpenAI's `x-ratelimit-*` (omitted when unlimited)."""

    requests: Window | None = None
    tokens: Window | None = None
    day: Window | None = None

    def headers(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for suffix, window in (("requests", self.requests), ("tokens", self.tokens), ("tokens-day", self.day)):
            if window is not None:
                out[f"x-ratelimit-limit-{suffix}"] = str(window.limit)
                out[f"x-ratelimit-remaining-{suffix}"] = str(window.remaining)
                out[f"x-ratelimit-reset-{suffix}"] = format_reset(window.reset)
        return out


NO_STATUS = QuotaStatus()


def _tightest(windows: Iterable[Window | None]) -> Window | None:
    present = [w for w in windows if w is not None]
    return min(present, key=lambda w: (w.remaining, -w.reset)) if present else None


def merge_status(statuses: Iterable[QuotaStatus]) -> QuotaStatus:
    """Several subjects' limits as one: per kind of limit, the one with the least room left."""
    listed = list(statuses)
    return QuotaStatus(_tightest(s.requests for s in listed), _tightest(s.tokens for s in listed),
                       _tightest(s.day for s in listed))


@dataclass(eq=False)
class Reservation:
    """What `reserve` took for one request; settle or release it exactly once (later calls do nothing)."""

    subject: str
    limits: Limits
    tokens: int
    day: int  # the UTC day (days since 1970-01-01) the tokens were counted on
    status: QuotaStatus = NO_STATUS
    done: bool = False


@dataclass
class _Usage:
    requests: float  # rpm bucket level, in requests, as of `at`
    tokens: float  # tpm bucket level, in tokens, as of `at`
    at: float  # Unix time
    day: int  # the UTC day `day_tokens` counts for, in days since 1970-01-01
    day_tokens: int


EPOCH = date(1970, 1, 1)


def _minute_wait(level: float, cost: float, limit: int) -> float:
    return max(0.0, (level + cost - limit) * 60.0 / limit)


class QuotaService:
    def __init__(self, conn: sqlite3.Connection, clock: Callable[[], float] = time.time) -> None:
        self.conn = conn
        self.clock = clock
        self._lock = threading.Lock()
        self._usage: dict[str, _Usage] = {}
        self._daily_limits: dict[str, int] = {}  # subject -> its daily budget, as last seen (for the alert rules)

    def reserve(self, subject: str, limits: Limits, tokens: int) -> Reservation:
        """Take one request and `tokens` for `subject`, or raise `RateLimited` naming the limit and the wait."""
        if limits.unlimited:
            return Reservation(subject, limits, 0, 0, done=True)
        with self._lock:
            now = self.clock()
            usage = self._current(subject, limits, now)
            self._check(usage, limits, tokens, now, _whose(subject))
            if limits.rpm:
                usage.requests += 1
            if limits.tpm:
                usage.tokens += tokens
            if limits.daily_tokens:
                usage.day_tokens += tokens
                self._daily_limits[subject] = limits.daily_tokens
            self._save(subject, usage)
            return Reservation(subject, limits, tokens, usage.day, self._status(usage, limits, now))

    def reserve_all(self, subjects: Sequence[tuple[str, Limits]], tokens: int) -> list[Reservation]:
        """Reserve on every (subject, limits) with a limit, or on none: when one refuses, those already taken are
        released and its `RateLimited` is raised."""
        taken: list[Reservation] = []
        try:
            for subject, limits in subjects:
                if not limits.unlimited:
                    taken.append(self.reserve(subject, limits, tokens))
        except RateLimited:
            for reservation in taken:
                self.release(reservation)
            raise
        return taken

    def settle(self, reservation: Reservation, used_tokens: int) -> None:
        """Replace the reservation's estimate with the tokens the request really used."""
        self._finish(reservation, used_tokens, give_back_request=False)

    def release(self, reservation: Reservation) -> None:
        """Give back the request and all its tokens: it failed before generating anything."""
        self._finish(reservation, 0, give_back_request=True)

    def status(self, subject: str, limits: Limits) -> QuotaStatus:
        if limits.unlimited:
            return NO_STATUS
        with self._lock:
            now = self.clock()
            return self._status(self._current(subject, limits, now), limits, now)

    def daily_use(self) -> dict[str, float]:
        """Subject -> the share of its daily token budget spent today, for the subjects with a budget that made a
        request since the start (what the `KeyNearQuota` alert watches)."""
        with self._lock:
            today = int(self.clock() // DAY_SECONDS)
            return {subject: (usage.day_tokens if usage.day == today else 0) / limit
                    for subject, limit in self._daily_limits.items()
                    if (usage := self._usage.get(subject)) is not None and limit > 0}

    def _finish(self, reservation: Reservation, used_tokens: int, *, give_back_request: bool) -> None:
        if reservation.done:
            return
        reservation.done = True
        limits = reservation.limits
        with self._lock:
            now = self.clock()
            usage = self._current(reservation.subject, limits, now)
            delta = max(0, used_tokens) - reservation.tokens
            if limits.tpm:
                usage.tokens = max(0.0, usage.tokens + delta)
            if limits.daily_tokens and usage.day == reservation.day:
                usage.day_tokens = max(0, usage.day_tokens + delta)
            if give_back_request and limits.rpm:
                usage.requests = max(0.0, usage.requests - 1)
            self._save(reservation.subject, usage)
            reservation.status = self._status(usage, limits, now)

    def _current(self, subject: str, limits: Limits, now: float) -> _Usage:
        """The subject's usage drained up to `now` (loaded from the database on first use)."""
        usage = self._usage.get(subject)
        if usage is None:
            usage = self._usage[subject] = self._load(subject, now)
        elapsed = max(0.0, now - usage.at)  # a clock stepped backwards drains nothing
        if limits.rpm:
            usage.requests = max(0.0, usage.requests - elapsed * limits.rpm / 60.0)
        if limits.tpm:
            usage.tokens = max(0.0, usage.tokens - elapsed * limits.tpm / 60.0)
        usage.at = now
        if limits.daily_tokens and int(now // DAY_SECONDS) > usage.day:
            usage.day, usage.day_tokens = int(now // DAY_SECONDS), 0
        return usage

    def _check(self, usage: _Usage, limits: Limits, tokens: int, now: float, whose: str) -> None:
        refusals: list[tuple[float, str, str]] = []  # (wait, limit, message); inf = waiting cannot help
        if limits.rpm and usage.requests + 1 > limits.rpm + _EPSILON:
            wait = _minute_wait(usage.requests, 1, limits.rpm)
            refusals.append((wait, "rpm", f"{whose} limit of {limits.rpm} requests per minute (rpm) is reached; "
                                          f"retry in {math.ceil(wait)} s"))
        if limits.tpm and tokens > limits.tpm:
            refusals.append((math.inf, "tpm", _too_large(tokens, whose, f"{limits.tpm} tokens per minute (tpm)")))
        elif limits.tpm and usage.tokens + tokens > limits.tpm + _EPSILON:
            wait = _minute_wait(usage.tokens, tokens, limits.tpm)
            left = max(0, math.floor(limits.tpm - usage.tokens))
            refusals.append((wait, "tpm", f"{whose} limit of {limits.tpm} tokens per minute (tpm) has {left} left "
                                          f"and this request needs about {tokens} (prompt estimate plus max_tokens); "
                                          f"retry in {math.ceil(wait)} s, or lower max_tokens"))
        if limits.daily_tokens and tokens > limits.daily_tokens:
            budget = f"a daily budget of {limits.daily_tokens} tokens (daily_tokens)"
            refusals.append((math.inf, "daily_tokens", _too_large(tokens, whose, budget)))
        elif limits.daily_tokens and usage.day_tokens + tokens > limits.daily_tokens:
            wait = DAY_SECONDS - now % DAY_SECONDS
            left = max(0, limits.daily_tokens - usage.day_tokens)
            refusals.append((wait, "daily_tokens",
                             f"{whose} daily budget of {limits.daily_tokens} tokens (daily_tokens) has {left} left "
                             f"and this request needs about {tokens} (prompt estimate plus max_tokens); it renews at "
                             f"00:00 UTC, in {format_reset(wait)}; lower max_tokens to fit in what is left"))
        if refusals:
            wait, limit, message = max(refusals, key=lambda r: r[0])
            headers = self._status(usage, limits, now).headers()
            raise RateLimited(message, limit=limit, retry_after=None if math.isinf(wait) else wait,
                              rate_headers=headers)

    @staticmethod
    def _status(usage: _Usage, limits: Limits, now: float) -> QuotaStatus:
        requests = tokens = day = None
        if limits.rpm:
            requests = Window(limits.rpm, max(0, math.floor(limits.rpm - usage.requests + _EPSILON)),
                              usage.requests * 60.0 / limits.rpm)
        if limits.tpm:
            tokens = Window(limits.tpm, max(0, math.floor(limits.tpm - usage.tokens + _EPSILON)),
                            usage.tokens * 60.0 / limits.tpm)
        if limits.daily_tokens:
            day = Window(limits.daily_tokens, max(0, limits.daily_tokens - usage.day_tokens),
                         DAY_SECONDS - now % DAY_SECONDS if usage.day_tokens else 0.0)
        return QuotaStatus(requests, tokens, day)

    def _load(self, subject: str, now: float) -> _Usage:
        row = self.conn.execute("SELECT requests, tokens, at, day, day_tokens FROM quota_usage WHERE subject = ?",
                                (subject,)).fetchone()
        if row is None:
            return _Usage(0.0, 0.0, now, int(now // DAY_SECONDS), 0)
        day = (date.fromisoformat(row[3]) - EPOCH).days
        return _Usage(float(row[0]), float(row[1]), float(row[2]), day, int(row[4]))

    def _save(self, subject: str, usage: _Usage) -> None:
        try:
            self.conn.execute(
                "INSERT INTO quota_usage(subject, requests, tokens, at, day, day_tokens) VALUES (?,?,?,?,?,?) "
                "ON CONFLICT(subject) DO UPDATE SET requests = excluded.requests, tokens = excluded.tokens, "
                "at = excluded.at, day = excluded.day, day_tokens = excluded.day_tokens",
                (subject, usage.requests, usage.tokens, usage.at, date.fromordinal(EPOCH.toordinal() + usage.day)
                 .isoformat(), usage.day_tokens))
        except sqlite3.Error as exc:  # memory stays authoritative; only a restart would forget this change
            log.warning("quota.persist_failed", subject=subject, error=str(exc))


def _whose(subject: str) -> str:
    return "your user's" if subject.startswith("user:") else "this key's"


def _too_large(tokens: int, whose: str, allowance: str) -> str:
    return (f"this request needs about {tokens} tokens (prompt estimate plus max_tokens) but {whose} limits allow "
            f"{allowance}, so waiting will not help; lower max_tokens or shorten the prompt")
