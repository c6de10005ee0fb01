"""JWT Permissions as server/permissions.py reads them: the claim, the precedence of scopes
(https://docs.useparagon.com/apis/api-reference/jwt-permissions), and the conservative reading
of what it does not understand."""

from __future__ import annotations

from typing import Any

import pytest

from server.permissions import CLAIM, MAX_SCOPES, UNRESTRICTED, Permissions

ADS = "facebookAds"
A = "0b7c6a52-1f0e-4c3b-9a55-6d1f2e3a4b5c"
B = "9e8d7c6b-5a49-4382-b1a0-fedcba987654"


def of(claim: Any) -> Permissions:
    return Permissions.of_claims({"sub": "user-1", CLAIM: claim})


def grants(permissions: Permissions) -> tuple[bool, bool, bool, bool]:
    """(integration, credential A, credential B, the project's token)."""
    return (
        permissions.may_use_integration(ADS),
        permissions.may_use_credential(ADS, A),
        permissions.may_use_credential(ADS, B),
        permissions.may_use_credential(ADS, None),
    )


def test_without_the_claim_everything_is_allowed():
    permissions = Permissions.of_claims({"sub": "user-1"})
    assert permissions is UNRESTRICTED and not permissions.restricted
    assert grants(permissions) == (True, True, True, True)


@pytest.mark.parametrize("claim", [None, [], ["integration:*"], "integration:*", True, 1])
def test_a_claim_that_is_not_an_object_grants_nothing(claim):
    permissions = of(claim)
    assert permissions.restricted
    assert grants(permissions) == (False, False, False, False)


def test_an_empty_claim_grants_nothing():
    assert grants(of({})) == (False, False, False, False)


@pytest.mark.parametrize(
    ("claim", "expected"),
    [
        ({"integration:*": True}, (True, True, True, True)),
        ({"integration:*": False, f"integration:{ADS}": True}, (True, True, True, True)),
        ({f"integration:{ADS}": False, "credential:*": True}, (True, True, True, True)),
        ({"integration:*": True, f"integration:{ADS}": False}, (False, False, False, False)),
        ({"credential:*": False, f"credential:{A}": True}, (True, True, False, False)),
        ({"credential:*": True, f"credential:{A}": False}, (True, False, True, True)),
        ({"integration:*": True, f"credential:{A}": False}, (True, False, True, True)),
        ({"integration:*": False, f"credential:{A}": True}, (True, True, False, False)),
        ({f"credential:{A}": True}, (True, True, False, False)),
        # credential:* is more specific than integration:<name>: it decides over it.
        ({f"integration:{ADS}": True, "credential:*": False}, (False, False, False, False)),
    ],
    ids=repr,
)
def test_the_most_specific_scope_present_decides(claim, expected):
    assert grants(of(claim)) == expected


@pytest.mark.parametrize("value", [False, None, 1, "true", {"read": True}, [True]])
def test_only_json_true_grants(value):
    assert grants(of({"integration:*": value})) == (False, False, False, False)
    # ... at every level: a finer scope with such a value denies what a coarser one granted
    assert grants(of({"integration:*": True, f"credential:{A}": value}))[1] is False


@pytest.mark.parametrize(
    "scope",
    ["configuration:*", "configuration:ext:abc", "integration:salesforce", "credential", "other"],
)
def test_scopes_funnelgate_does_not_have_are_ignored(scope):
    for value in (True, False):
        assert grants(of({scope: value})) == (False, False, False, False)
        assert grants(of({"integration:*": True, scope: value})) == (True, True, True, True)


def test_the_project_token_is_never_granted_by_a_credential_scope():
    permissions = of({f"credential:{A}": True, "credential:None": True, "credential:": True})
    assert permissions.may_use_credential(ADS, None) is False
    assert permissions.may_use_integration(ADS) is True  # through credential A


def test_an_integration_is_usable_when_only_one_credential_is_granted():
    permissions = of({"integration:*": False, f"integration:{ADS}": False, f"credential:{B}": True})
    assert grants(permissions) == (True, False, True, False)


def test_a_uuid_scope_names_the_credential_in_any_case():
    """A UUID is case-insensitive on input (RFC 9562, section 4): a denial written in upper
    case still denies the credential whose id is stored in lower case."""
    permissions = of({"integration:*": True, f"credential:{A.upper()}": False})
    assert permissions.may_use_credential(ADS, A) is False
    assert permissions.may_use_credential(ADS, B) is True
    granted = of({"integration:*": False, f"credential:{B.upper()}": True})
    assert granted.may_use_credential(ADS, B) is True
    # Two spellings of one credential that disagree: the denial stands.
    both = of({f"credential:{A.upper()}": True, f"credential:{A}": False})
    assert both.may_use_credential(ADS, A) is False


def test_a_claim_with_more_scopes_than_are_read_grants_nothing():
    """Scopes past the ones read could deny what earlier ones grant: none is assumed."""
    claim: dict[str, Any] = {"integration:*": True}
    claim.update({f"configuration:ext:{n}": True for n in range(MAX_SCOPES - 1)})
    assert grants(of(claim)) == (True, True, True, True)
    claim[f"credential:{A}"] = False
    assert grants(of(claim)) == (False, False, False, False)
