"""Who is calling: the URL's project and the connected user, for every route and MCP."""

from __future__ import annotations

from typing import NamedTuple

from starlette.requests import Request

from server.auth import bearer_token
from server.config import Project
from server.errors import NotFound
from server.permissions import Permissions


def project_of(request: Request) -> Project:
    project_id = request.path_params["project_id"]
    project: Project | None = request.app.state.config.projects.get(project_id)
    if project is None:
        raise NotFound("Unknown project.", code="UNKNOWN_PROJECT")
    request.state.project = project.id
    return project


class Caller(NamedTuple):
    project: Project
    user_id: str  # the verified token's `sub`
    permissions: Permissions  # its JWT Permissions claim, for this request only


def authenticate(request: Request) -> Caller:
    """The URL's project, the connected user and what its token may use."""
    project = project_of(request)
    token = bearer_token(request.headers.get("authorization"))
    return Caller(project, *request.app.state.tokens.caller(token, project))
