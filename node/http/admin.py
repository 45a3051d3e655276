"""Administration (``/api/v1/tokens``, role admin): list, create and revoke API tokens, as
``dicom-node token`` does. A created token is in the response once; lists never show a token or
its hash."""

from __future__ import annotations

import logging

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from models.errors import ConfigError
from node.http.api import NOT_FOUND, PREFIX, Ctx, not_found
from node.http.errors import Problem
from node.roles import Role
from node.tokens import NAME_PATTERN, TokenInfo, create_token, list_tokens, revoke_token

log = logging.getLogger("node.http.api")

router = APIRouter(prefix=PREFIX, tags=["admin"])


class TokenOut(BaseModel):
    name: str
    role: Role
    created_at: float
    revoked_at: float | None
    last_used_at: float | None


class TokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_PATTERN.pattern)
    role: Role


class TokenCreated(BaseModel):
    name: str
    role: Role
    token: str
    """Shown this once; only its hash is kept."""


def _out(t: TokenInfo) -> TokenOut:
    return TokenOut(name=t.name, role=t.role, created_at=t.created_at, revoked_at=t.revoked_at,
                    last_used_at=t.last_used_at)


@router.get("/tokens", summary="API tokens: names, roles, dates (never the tokens)")
def tokens(ctx: Ctx) -> list[TokenOut]:
    return [_out(t) for t in list_tokens(ctx.catalog)]


@router.post("/tokens", status_code=201, summary="Create an API token (shown once in the response)",
             responses={409: {"description": "problem+json, code name-taken: an active token has this name"}})
def create(ctx: Ctx, body: TokenRequest) -> TokenCreated:
    try:
        token = create_token(ctx.catalog, body.name, body.role, ctx.clock())
    except ConfigError as exc:
        raise Problem(409, "name-taken", str(exc)) from None
    log.info("API token %s (%s) created (API)", body.name, body.role.value)
    return TokenCreated(name=body.name, role=body.role, token=token)


@router.post("/tokens/{name}/revoke", summary="Revoke an API token", responses=NOT_FOUND)
def revoke(ctx: Ctx, name: str) -> TokenOut:
    if not revoke_token(ctx.catalog, name, ctx.clock()):
        raise not_found("active token", name)
    log.info("API token %s revoked (API)", name)
    return next(_out(t) for t in reversed(list_tokens(ctx.catalog)) if t.name == name)
