"""JWT Permissions: what a Paragon User Token may use, from its
`urn:useparagon:connect:permissions` claim (https://docs.useparagon.com/apis/api-reference/jwt-permissions).

The claim maps scopes to permissions. Scopes go from least to most specific, and "permissions
designated at more specific scopes will override those inherited from less specific scopes".
Without the claim a token may use everything of its user. Claims are evaluated per request and
never stored.

funnelgate applies the scopes that exist here: `integration:*`, `integration:<name>`,
`credential:*` and `credential:<id>`. It has no configurations, so `configuration:*` and
`configuration:ext:<id>` are ignored, as are other integrations' scopes and unknown keys. It
never grants more than the token says: with a claim, what no scope grants is denied; only JSON
`true` grants, and any other value at one of these scopes (`false`, an object of finer
permissions funnelgate does not know, a string) denies; a claim that is not an object, or has
more scopes than are read, grants nothing. A credential's UUID is matched in any case (RFC 9562,
section 4: case-insensitive on input), so a denial spelled in upper case still denies.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

CLAIM = "urn:useparagon:connect:permissions"
MAX_SCOPES = 1000  # a claim's keys read at most: the token itself is capped at 8 KiB
_CREDENTIAL = "credential:"


@dataclass(frozen=True, slots=True)
class Permissions:
    """A token's permissions; `scopes` is None when it carries no claim (everything allowed)."""

    scopes: Mapping[str, bool] | None = None

    @classmethod
    def of_claims(cls, claims: Mapping[str, Any]) -> Permissions:
        if CLAIM not in claims:
            return UNRESTRICTED
        claim = claims[CLAIM]
        if not isinstance(claim, dict) or len(claim) > MAX_SCOPES:
            return cls({})  # an unread scope could deny what a read one grants
        scopes: dict[str, bool] = {}
        for key, value in claim.items():
            scope = _canonical(str(key))
            # Two spellings of one credential's scope: a denial by either stands.
            scopes[scope] = scopes.get(scope, True) and value is True
        return cls(scopes)

    @property
    def restricted(self) -> bool:
        return self.scopes is not None

    def _decide(self, integration: str, credential_id: str | None) -> bool | None:
        assert self.scopes is not None
        decision: bool | None = None
        scopes = ["integration:*", f"integration:{integration}", "credential:*"]
        if credential_id is not None:
            scopes.append(_canonical(_CREDENTIAL + credential_id))
        for scope in scopes:  # least specific first: the last one present wins
            if scope in self.scopes:
                decision = self.scopes[scope]
        return decision

    def may_use_integration(self, integration: str) -> bool:
        """Whether any use of the integration is granted: at its own level, or through a
        credential granted by id."""
        if self.scopes is None:
            return True
        if self._decide(integration, None):
            return True
        return any(
            granted and scope.startswith(_CREDENTIAL) and scope != "credential:*"
            for scope, granted in self.scopes.items()
        )

    def may_use_credential(self, integration: str, credential_id: str | None) -> bool:
        """Whether the token may send with this credential (None: the project's token, which
        no `credential:<id>` scope names)."""
        if self.scopes is None:
            return True
        return self._decide(integration, credential_id) is True


UNRESTRICTED = Permissions()


def canonical_id(credential_id: str) -> str:
    """A UUID in its lower-case form (RFC 9562 §4: UUIDs are case-insensitive on input), as
    credential ids are stored; anything else as it is."""
    try:
        return str(uuid.UUID(credential_id))
    except ValueError:
        return credential_id


def _canonical(scope: str) -> str:
    """`credential:` and a UUID in its lower-case hyphenated form; any other scope as is."""
    if not scope.startswith(_CREDENTIAL) or scope == "credential:*":
        return scope
    return _CREDENTIAL + canonical_id(scope[len(_CREDENTIAL) :])
