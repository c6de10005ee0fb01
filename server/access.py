"""Who is calling: the URL's project and the connected user, for every route and MCP."""

from __future__ import annotations

from starlette.requests import Request

from server.auth import bearer_token
from server.config import Project
from server.errors import NotFound


def project_of(request: Request) -> Project:
    project_id = request.path_params["project_id"]
    project: Project | None = request.app.state.config.projects.get(project_id)
    if project is None:
        raise NotFound("Unknown project.", code="UNKNOWN_PROJECT")
    request.state.project = project.id
    return project


def authenticate(request: Request) -> tuple[Project, str]:
    """The URL's project and the connected user (the verified token's `sub`)."""
    project = project_of(request)
    token = bearer_token(request.headers.get("authorization"))
    return project, request.app.state.tokens.verify(token, project)
