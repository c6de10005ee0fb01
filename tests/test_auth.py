"""The verified-token cache keeps every property of full verification."""

from __future__ import annotations

import time

import jwt
import pytest

from server import auth
from server.auth import VerifiedTokens
from server.config import Project
from server.errors import Unauthorized
from tests.support import make_config


@pytest.fixture
def project(tmp_path, rsa_key):
    return next(iter(make_config(tmp_path, rsa_key).projects.values()))


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def test_a_repeated_token_is_verified_once_until_its_exp_passes(project, sign, monkeypatch):
    full_checks: list[str] = []
    real_verify = auth._verify

    def counted(token: str, project: Project, now: float) -> tuple[str, float]:
        full_checks.append(token)
        return real_verify(token, project, now)

    monkeypatch.setattr(auth, "_verify", counted)
    clock = Clock()
    tokens = VerifiedTokens(clock=clock)
    token = sign(exp=int(clock.now) + 60)
    assert [tokens.verify(token, project) for _ in range(3)] == ["user-1"] * 3
    assert len(full_checks) == 1
    clock.now += 60 + 31  # past exp and the 30 s leeway: the cache no longer vouches for it
    with pytest.raises(Unauthorized, match="expired"):
        tokens.verify(token, project)
    assert len(full_checks) == 2


def test_an_expired_token_is_refused(project, sign):
    with pytest.raises(Unauthorized, match="expired"):
        VerifiedTokens(clock=time.time).verify(sign(exp=int(time.time()) - 120), project)


def test_a_tampered_copy_of_a_cached_token_is_refused(project, sign, other_rsa_key):
    tokens = VerifiedTokens(clock=time.time)
    token = sign()
    tokens.verify(token, project)
    header, _, signature = token.split(".")
    forged = jwt.encode({"sub": "admin", "iat": 1, "exp": 2**31}, other_rsa_key, algorithm="RS256")
    with pytest.raises(Unauthorized):
        tokens.verify(f"{header}.{forged.split('.')[1]}.{signature}", project)
    with pytest.raises(Unauthorized):
        tokens.verify(forged, project)


def test_failures_are_not_remembered_and_the_cache_is_bounded(project, sign):
    tokens = VerifiedTokens(clock=time.time, max_entries=3)
    for _ in range(2):
        with pytest.raises(Unauthorized):
            tokens.verify("not.a.jwt", project)
    issued = [sign(sub=f"user-{i}") for i in range(5)]
    assert [tokens.verify(t, project) for t in issued] == [f"user-{i}" for i in range(5)]
    assert len(tokens._entries) == 3
