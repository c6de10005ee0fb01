"""User tokens: the claims the README documents, ES256 as well as RS256, and a verified-token
cache that keeps every property of full verification."""

from __future__ import annotations

import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from server import auth
from server.auth import LEEWAY_SECONDS, VerifiedTokens
from server.config import Project
from server.errors import Unauthorized
from tests.support import (
    NOW,
    PROJECT,
    PROJECT_TOKEN,
    funnel_parameters,
    make_config,
    sign_token,
)


@pytest.fixture
def project(tmp_path, rsa_key) -> Project:
    return make_config(tmp_path, rsa_key).projects[PROJECT]


@pytest.fixture
def full_checks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The tokens that went through full verification (the cache let them by otherwise)."""
    checked: list[str] = []
    real_verify = auth._verify

    def counted(token: str, project: Project, now: float) -> tuple[auth.Verified, float]:
        checked.append(token)
        return real_verify(token, project, now)

    monkeypatch.setattr(auth, "_verify", counted)
    return checked


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def test_a_repeated_token_is_verified_once_until_its_exp_passes(project, sign, full_checks):
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


def test_the_cache_vouches_for_a_token_through_the_leeway_after_its_exp(project, sign, full_checks):
    clock = Clock()
    tokens = VerifiedTokens(clock=clock)
    token = sign(exp=int(clock.now) + 60)
    tokens.verify(token, project)
    clock.now += 60 + LEEWAY_SECONDS - 1  # expired, but within the 30 s clock leeway
    assert tokens.verify(token, project) == "user-1"
    assert len(full_checks) == 1


@pytest.mark.parametrize(
    ("claims", "accepted"),
    [({"exp": int(NOW) - 29}, True), ({"exp": int(NOW) - 31}, False),
     ({"iat": int(NOW) + 29}, True), ({"iat": int(NOW) + 31}, False),
     ({"nbf": int(NOW) + 29}, True), ({"nbf": int(NOW) + 31}, False)],
)  # fmt: skip
def test_times_are_checked_with_30_seconds_of_leeway(project, sign, claims, accepted):
    token = sign(**{"iat": int(NOW) - 60, **claims})
    tokens = VerifiedTokens(clock=lambda: NOW)
    if accepted:
        assert tokens.verify(token, project) == "user-1"
    else:
        with pytest.raises(Unauthorized):
            tokens.verify(token, project)


@pytest.mark.parametrize(
    ("aud", "accepted"),
    [(f"useparagon.com/{PROJECT}", True),
     (["useparagon.com/another", f"useparagon.com/{PROJECT}"], True),
     (["useparagon.com/another"], False), ("useparagon.com/another", False), ([], False),
     (f"useparagon.com/{PROJECT}/x", False)],
)  # fmt: skip
def test_audience_one_value_or_a_list_must_name_the_project(project, sign, aud, accepted):
    tokens = VerifiedTokens(clock=lambda: NOW)
    if accepted:
        assert tokens.verify(sign(aud=aud), project) == "user-1"
    else:
        with pytest.raises(Unauthorized, match="audience"):
            tokens.verify(sign(aud=aud), project)


def test_a_p256_project_takes_es256_tokens_and_nothing_else(tmp_path, rsa_key, make_client):
    key = ec.generate_private_key(ec.SECP256R1())
    config = make_config(tmp_path, key, facebook_access_token=PROJECT_TOKEN)
    tokens = VerifiedTokens(clock=lambda: NOW)
    assert tokens.verify(sign_token(key), config.projects[PROJECT]) == "user-1"
    with pytest.raises(Unauthorized):
        tokens.verify(sign_token(rsa_key), config.projects[PROJECT])  # RS256
    with pytest.raises(Unauthorized):
        tokens.verify(sign_token(ec.generate_private_key(ec.SECP256R1())), config.projects[PROJECT])

    response = make_client(config).post(
        f"/projects/{PROJECT}/tools",
        json={"tool": "FACEBOOK_ADS_SEND_FUNNEL_EVENT", "parameters": funnel_parameters()},
        headers={"Authorization": f"Bearer {sign_token(key)}"},
    )
    assert response.status_code == 200, response.text
