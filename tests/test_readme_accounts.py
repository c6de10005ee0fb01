"""The README's examples of several accounts per user, JWT Permissions and the dry run's
credential, run as written: its shell block with bash against a live funnelgate on 127.0.0.1
(the `funnelgate` command of this checkout, curl), its JSON claims signed into user tokens."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from server.app import create_app
from server.config import load_config
from server.storage.credentials import open_credentials
from server.storage.crypto import add_secret_key
from tests.live import serving
from tests.support import TRACE_ID, WallClockGraph, config_toml, public_pem, sign_token

README = (Path(__file__).parent.parent / "README.md").read_text()
DOCUMENTED_URL = "http://127.0.0.1:8000"
PROJECT_ID, USER_ID = "demo", "ada"  # the README's own names
BRAND_TOKEN = "EAAB-brand-bm-token"
AGENCY_TOKEN = "EAAB-agency-bm-token"
PROJECT_TOKEN = "EAAB-project-wide-token"
CREDENTIAL_HEADER = "-H 'X-Paragon-Credential: ext:agency-bm-2'"
PERMISSIONS = "urn:useparagon:connect:permissions"


def section(heading: str) -> str:
    """The README's text from `heading` to the next ## or ### heading (a shell block's
    comments start with a single #)."""
    start = README.index(f"\n{heading}\n") + len(heading) + 2
    following = re.search(r"^#{2,6} ", README[start:], re.MULTILINE)
    return README[start : start + following.start()] if following else README[start:]


def fence(heading: str, language: str) -> str:
    """The first ```language block of a section."""
    found = re.search(rf"^```{language}\n(.*?)^```$", section(heading), re.MULTILINE | re.DOTALL)
    assert found, f"no ```{language} block under {heading!r}"
    return found.group(1)


def documented_json(text: str) -> list[Any]:
    """The JSON documents of a block, one after another (one may span lines)."""
    decoder, documents, at = json.JSONDecoder(), [], 0
    while (at := len(text) - len(text[at:].lstrip())) < len(text):
        document, at = decoder.raw_decode(text, at)
        documents.append(document)
    return documents


@dataclass
class Accounts:
    """The live server after the README's script ran, and what the script printed."""

    url: str
    graph: WallClockGraph
    env: dict[str, str]
    script: subprocess.CompletedProcess[str]
    sent_by_script: list[str]  # the access tokens of what Meta got while the script ran
    ids: dict[str, str]  # credential id by label

    def bash(self, script: str) -> subprocess.CompletedProcess[str]:
        return bash(script, self.url, self.env)

    def tokens_sent(self) -> list[str]:
        return tokens_sent(self.graph)


def bash(script: str, url: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """A README shell block run as a user would, against the server at `url`."""
    script = script.replace(DOCUMENTED_URL, url)
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True,
                          text=True, env=env, timeout=60)  # fmt: skip


def tokens_sent(graph: WallClockGraph) -> list[str]:
    """The access token of each request Meta got."""
    return [received.json()["access_token"] for received in graph.received]


@pytest.fixture(scope="module")
def accounts(tmp_path_factory, rsa_key: rsa.RSAPrivateKey) -> Iterator[Accounts]:
    root = tmp_path_factory.mktemp("readme-accounts")
    (root / "project.pub.pem").write_text(public_pem(rsa_key))
    add_secret_key(root / "secret.key")
    storage = {"url": "sqlite:///funnelgate.db", "secret_key_file": "secret.key"}
    config_file = root / "funnelgate.toml"
    config_file.write_text(config_toml({"storage": storage}, project=PROJECT_ID,
                                       access_token=PROJECT_TOKEN))  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUNNELGATE_")}
    env |= {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "CONFIG": str(config_file), "PROJECT_ID": PROJECT_ID, "USER_ID": USER_ID,
        "TOKEN": sign_token(rsa_key, USER_ID),
        "BRAND_TOKEN": BRAND_TOKEN, "AGENCY_TOKEN": AGENCY_TOKEN,
    }  # fmt: skip
    # The server and the script's `funnelgate` commands read the same file.
    config = load_config(config_file, {})
    graph = WallClockGraph()
    with serving(create_app(config, graph_transport=graph.transport())) as url:
        script = bash(fence("### Several accounts per user", "sh"), url, env)
        with contextlib.closing(open_credentials(config.storage, verify=False)) as store:
            ids = {c.label or "": c.id for c in store.list(PROJECT_ID, USER_ID)}
        yield Accounts(url, graph, env, script, tokens_sent(graph), ids)


@pytest.fixture
def live(accounts: Accounts) -> Accounts:
    """`accounts` with the fake Graph's record emptied."""
    accounts.graph.reset()
    return accounts


def post_event(live: Accounts, token: str, credential: str | None = None) -> httpx.Response:
    """The README's event (a Lead by e-mail), by Run Tool."""
    headers = {"Authorization": f"Bearer {token}"}
    if credential is not None:
        headers["X-Paragon-Credential"] = credential
    parameters = {"pixel": "1234567890", "eventName": "Lead", "actionSource": "email",
                  "customerEmail": "ada@example.com"}  # fmt: skip
    return httpx.post(f"{live.url}/projects/{PROJECT_ID}/tools", headers=headers, timeout=10,
                      json={"tool": "FACEBOOK_ADS_SEND_FUNNEL_EVENT", "parameters": parameters})  # fmt: skip


# Several accounts per user


def test_the_several_accounts_script_sends_with_the_agency_account(accounts: Accounts):
    result = accounts.script
    assert result.returncode == 0, result.stderr
    assert accounts.sent_by_script == [AGENCY_TOKEN]
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("PROJECT\t"))
    columns = lines[header].split("\t")
    rows = lines[header + 1 : header + 3]
    listed = [dict(zip(columns, row.split("\t"), strict=True)) for row in rows]
    shown = ["PROJECT", "USER", "ID", "EXTERNAL_ID", "LABEL", "DEFAULT", "STATUS"]
    assert {row["LABEL"]: [row[c] for c in shown] for row in listed} == {
        "Brand BM": [PROJECT_ID, USER_ID, accounts.ids["Brand BM"], "-", "Brand BM", "true", "valid"],
        "Agency BM": [PROJECT_ID, USER_ID, accounts.ids["Agency BM"], "agency-bm-2", "Agency BM",
                      "false", "valid"],
    }  # fmt: skip
    for secret in (BRAND_TOKEN, AGENCY_TOKEN):
        assert secret not in result.stdout + result.stderr
    # The answer is Meta's own JSON, unwrapped.
    assert json.loads(lines[-1]) == {"events_received": 1, "messages": [], "fbtrace_id": TRACE_ID}


def test_the_same_curl_without_the_header_goes_with_the_default_brand_account(live: Accounts):
    script = fence("### Several accounts per user", "sh")
    curl = script[script.index("curl ") :]
    assert CREDENTIAL_HEADER in curl
    result = live.bash(curl.replace(CREDENTIAL_HEADER, ""))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["events_received"] == 1
    assert live.tokens_sent() == [BRAND_TOKEN]


# JWT Permissions


def permission_tokens(live: Accounts, rsa_key: rsa.RSAPrivateKey) -> list[str]:
    """The README's three claims, the placeholder credential id made the agency's real one."""
    block = fence("### JWT Permissions", "json")
    assert "9d2a71f4-..." in block
    claims = documented_json(block.replace("9d2a71f4-...", live.ids["Agency BM"]))
    assert len(claims) == 3 and {c["sub"] for c in claims} == {USER_ID}
    return [sign_token(rsa_key, USER_ID, **{PERMISSIONS: c[PERMISSIONS]}) for c in claims]


def test_the_first_claim_may_use_everything(live: Accounts, rsa_key):
    first, _, _ = permission_tokens(live, rsa_key)
    answer = post_event(live, first)
    assert answer.status_code == 200, answer.text
    assert live.tokens_sent() == [BRAND_TOKEN]


def test_the_second_claim_is_forbidden_the_integration(live: Accounts, rsa_key):
    _, second, _ = permission_tokens(live, rsa_key)
    answer = post_event(live, second)
    assert (answer.status_code, answer.json()["code"]) == (403, "INTEGRATION_FORBIDDEN")
    assert live.graph.received == []


@pytest.mark.parametrize(("claim", "listed"), [(0, True), (1, False)])
def test_list_tools_hides_a_forbidden_integration(live: Accounts, rsa_key, claim, listed):
    token = permission_tokens(live, rsa_key)[claim]
    answer = httpx.get(f"{live.url}/projects/{PROJECT_ID}/tools", timeout=10,
                       headers={"Authorization": f"Bearer {token}"})  # fmt: skip
    assert answer.status_code == 200
    for key in ("tools", "actions"):
        assert bool(answer.json()[key].get("facebookAds")) is listed


def test_the_third_claim_may_send_only_with_the_credential_it_names(live: Accounts, rsa_key):
    _, _, third = permission_tokens(live, rsa_key)
    answer = post_event(live, third)  # the default is the brand's credential
    assert (answer.status_code, answer.json()["code"]) == (403, "CREDENTIAL_FORBIDDEN")
    assert live.graph.received == []
    answer = post_event(live, third, credential=live.ids["Agency BM"])
    assert answer.status_code == 200, answer.text
    assert live.tokens_sent() == [AGENCY_TOKEN]


# Dry run


@pytest.mark.parametrize(("header", "label", "source"),
                         [(None, "Brand BM", "default"), ("ext:agency-bm-2", "Agency BM", "header")])  # fmt: skip
def test_the_dry_run_names_the_credential_never_its_token(live: Accounts, header, label, source):
    curl = fence("### Dry run: see the exact request before going live", "sh")
    shown = re.search(r'"credential": (\{.*?\})', curl)
    assert shown, "the README's dry run shows no credential"
    documented = json.loads(shown.group(1))
    assert (documented["label"], documented["source"]) == ("Brand BM", "default")
    if header:
        assert "-H 'Content-Type" in curl
        curl = curl.replace("-H 'Content", f"-H 'X-Paragon-Credential: {header}' -H 'Content")
    result = live.bash(curl)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["dry_run"] is True
    expected = documented | {"id": live.ids[label], "label": label, "source": source}
    assert answer["credential"] == expected
    for secret in (BRAND_TOKEN, AGENCY_TOKEN, PROJECT_TOKEN):
        assert secret not in result.stdout
    assert live.graph.received == []
