"""SASL exchanges, credential checks and the AUTH throttle (pure, and shared by
worker processes through a database)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr

from smtpgate.config.schema import Limits
from smtpgate.inbound import throttle
from smtpgate.inbound.sasl import SaslExchange
from smtpgate.inbound.throttle import SharedAuthThrottle
from smtpgate.policy.auth import AuthThrottle, CredentialIndex, Throttle


def test_plain_with_and_without_initial_response() -> None:
    step = SaslExchange("PLAIN").start(b"\x00alice\x00s3cret")
    assert (step.username, step.password) == ("alice", "s3cret")
    exchange = SaslExchange("PLAIN")
    assert exchange.start(None).challenge == b""
    step = exchange.respond(b"alice\x00alice\x00s3cret")  # authzid equal to authcid is fine
    assert (step.username, step.password) == ("alice", "s3cret")


def test_plain_refuses_acting_for_someone_else_and_garbage() -> None:
    step = SaslExchange("PLAIN").start(b"admin\x00alice\x00s3cret")
    assert step.failure is not None
    assert step.failure.code == 535
    for bad in (b"alice\x00s3cret", b"\x00\x00pw", b"\x00\xff\xfe\x00pw"):
        failure = SaslExchange("PLAIN").start(bad).failure
        assert failure is not None
        assert failure.code == 501


def test_login_exchange() -> None:
    exchange = SaslExchange("LOGIN")
    assert exchange.start(None).challenge == b"Username:"
    assert exchange.respond(b"alice").challenge == b"Password:"
    step = exchange.respond(b"s3cret")
    assert (step.username, step.password) == ("alice", "s3cret")
    exchange = SaslExchange("LOGIN")
    assert exchange.start(b"alice").challenge == b"Password:"  # initial response = user name


def test_credentials_verify_names_the_owning_profile() -> None:
    index = CredentialIndex({"alice": ("submission", SecretStr("s3cret"))})
    assert index.verify("alice", "s3cret") == "submission"
    assert index.verify("alice", "wrong") is None
    assert index.verify("mallory", "s3cret") is None


def test_throttle_delays_then_locks_out_then_forgives() -> None:
    limits = Limits(
        max_auth_failures=3, auth_failure_window=60, auth_lockout=300, auth_failure_delay=1.0
    )
    throttle = AuthThrottle(limits)
    assert throttle.record_failure("192.0.2.1", 0) == 1.0
    assert throttle.record_failure("192.0.2.1", 1) == 2.0
    assert not throttle.locked("192.0.2.1", 2)
    throttle.record_failure("192.0.2.1", 2)
    assert throttle.locked("192.0.2.1", 3)
    assert not throttle.locked("192.0.2.2", 3)  # per client IP
    assert throttle.locked("192.0.2.1", 301)
    assert not throttle.locked("192.0.2.1", 303)  # the lockout ends
    assert throttle.record_failure("192.0.2.1", 304) == 1.0


def test_old_failures_fall_out_of_the_window() -> None:
    limits = Limits(max_auth_failures=2, auth_failure_window=10, auth_lockout=300)
    throttle = AuthThrottle(limits)
    throttle.record_failure("192.0.2.1", 0)
    throttle.record_failure("192.0.2.1", 20)
    assert not throttle.locked("192.0.2.1", 21)
    throttle.record_success("192.0.2.1")
    assert throttle.failures == {}


class TwoWorkers:
    """Two workers' SharedAuthThrottles on one database, taking turns: what a
    client meets when its connections land on either worker."""

    def __init__(self, directory: Path, limits: Limits) -> None:
        path = throttle.create(directory)
        self.workers = [SharedAuthThrottle(path, limits), SharedAuthThrottle(path, limits)]
        self.turn = 0

    def _next(self) -> SharedAuthThrottle:
        self.turn += 1
        return self.workers[self.turn % 2]

    def locked(self, ip: str, now: float) -> bool:
        return self._next().locked(ip, now)

    def record_failure(self, ip: str, now: float) -> float:
        return self._next().record_failure(ip, now)

    def record_success(self, ip: str) -> None:
        self._next().record_success(ip)


@pytest.mark.parametrize("shared", [False, True], ids=["one process", "two workers"])
def test_the_throttle_counts_a_clients_failures_wherever_they_land(
    tmp_path: Path, shared: bool
) -> None:
    limits = Limits(
        max_auth_failures=3, auth_failure_window=60, auth_lockout=300, auth_failure_delay=1.0
    )
    limiter: Throttle = TwoWorkers(tmp_path, limits) if shared else AuthThrottle(limits)
    assert limiter.record_failure("192.0.2.1", 0) == 1.0
    assert limiter.record_failure("192.0.2.1", 1) == 2.0  # the other worker saw the first
    assert not limiter.locked("192.0.2.1", 2)
    limiter.record_failure("192.0.2.1", 2)
    assert limiter.locked("192.0.2.1", 3)
    assert limiter.locked("192.0.2.1", 4)  # on both workers
    assert not limiter.locked("192.0.2.2", 3)  # per client IP
    assert not limiter.locked("192.0.2.1", 303)  # the lockout ends
    assert limiter.record_failure("192.0.2.1", 304) == 1.0
    limiter.record_failure("192.0.2.3", 305)
    limiter.record_success("192.0.2.3")
    assert limiter.record_failure("192.0.2.3", 306) == 1.0  # a success forgets the failures
    limiter.record_failure("192.0.2.4", 400)
    assert limiter.record_failure("192.0.2.4", 470) == 1.0  # out of the window


def test_a_shared_throttle_that_fails_counts_in_its_own_worker(tmp_path: Path) -> None:
    limits = Limits(max_auth_failures=2, auth_failure_window=60, auth_lockout=300)
    path = throttle.create(tmp_path)
    limiter = SharedAuthThrottle(path, limits)
    limiter.db.close()  # the database is gone: AUTH is still answered, and still throttled
    limiter.record_failure("192.0.2.1", 0)
    limiter.record_failure("192.0.2.1", 1)
    assert limiter.locked("192.0.2.1", 2)
