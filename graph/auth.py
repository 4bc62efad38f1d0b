"""Who is calling, and what they may do: API keys resolved to a Caller, the tier a request is served as, what a
caller may see, and signed image links. Pure: the key lookup is handed in (graph/keys.py reads the store).

The convention is the one gateways users already run (OpenAI project keys, LiteLLM virtual keys): the client sends
`Authorization: Bearer <key>` (what the official OpenAI SDK sends as its `api_key`; OpenAI API reference,
"Authentication": https://platform.openai.com/docs/api-reference/authentication), and the key's settings decide the
user tier, the limits and the tenant whose renders it sees.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time
from dataclasses import dataclass
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from graph.errors import BudgetExceeded, Forbidden, PrismError, RateLimited, Unauthorized
from graph.schemas import GenerationRequest

AuthMode = Literal["required", "optional", "off"]
AUTH_MODES: tuple[str, ...] = ("required", "optional", "off")
ENV_AUTH = "PRISM_AUTH"
ANONYMOUS = "anonymous"  # the tenant of requests without a key (optional mode); no key may name it
KEY_PREFIX = "prism_"


class AuthSpec(BaseModel):
    """The `auth` block of the app args."""

    model_config = ConfigDict(extra="forbid")

    mode: AuthMode = Field(default="optional", description=(
        "required: every call but /healthz and the playground page needs a key (401 without). optional: a key is "
        "used when sent; anonymous callers are `free` and see only anonymous renders (the loopback default). off: "
        "no keys; every caller is trusted, the body's `user_tier` is honoured and every render is visible (tests of "
        "the HTTP surface, or a Prism behind a gateway that authenticates). $PRISM_AUTH overrides it."))
    # OpenAI's image URLs are "only valid for 60 minutes after the image has been generated" (openai-ruby,
    # ImageEditParams#response_format, https://www.rubydoc.info/github/openai/openai-ruby): the same default here.
    url_ttl_s: int = Field(default=3600, ge=10, le=7 * 86_400,
                           description="How long a signed image link works without a key.")


def auth_mode(spec: AuthSpec, env: dict[str, str] | None = None) -> str:
    """The mode in force: $PRISM_AUTH when set (an operator or a test turns auth on without editing YAML), else the
    profile's; a wrong value fails the deploy naming the allowed ones."""
    value = (os.environ if env is None else env).get(ENV_AUTH, "").strip().lower()
    if not value:
        return spec.mode
    if value not in AUTH_MODES:
        raise ValueError(f"${ENV_AUTH} must be one of {list(AUTH_MODES)} but is {value!r}")
    return value


@dataclass(frozen=True)
class KeyInfo:
    """A key's settings as the store holds them (never the key itself)."""

    key_id: str
    tenant: str
    user_tier: str
    admin: bool = False
    gateway: bool = False
    rpm: int | None = None  # renders per minute
    concurrent: int | None = None  # renders at once
    budget_usd: float | None = None
    budget_window_s: float = 86_400.0
    disabled: bool = False


@dataclass(frozen=True)
class Caller:
    """Who a request comes from, as every later decision reads it."""

    tenant: str
    user_tier: str = "free"
    key: KeyInfo | None = None  # None: anonymous (optional mode) or auth off
    admin: bool = False  # sees every tenant's records and may call the operator routes
    trusted_tier: bool = False  # the body's user_tier is honoured (gateway keys; auth off)

    @property
    def key_id(self) -> str | None:
        return self.key.key_id if self.key else None

    @property
    def anonymous(self) -> bool:
        return self.key is None and not self.admin


# Auth off: one trusted caller (what every caller was before keys existed).
OPEN_CALLER = Caller(tenant=ANONYMOUS, admin=True, trusted_tier=True)
ANONYMOUS_CALLER = Caller(tenant=ANONYMOUS)


class KeyLookup(Protocol):
    def __call__(self, key: str) -> KeyInfo | None: ...


def bearer_key(authorization: str | None) -> str | None:
    """The key from an `Authorization: Bearer <key>` header; None when there is no header. A header in another
    scheme is refused (401) rather than ignored, so a misconfigured client learns why it is anonymous."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("the Authorization header must be `Bearer <API key>`", param="Authorization")
    return token.strip()


def resolve_caller(mode: str, authorization: str | None, lookup: KeyLookup) -> Caller:
    """The caller of a request. A Prism key that is sent is always checked: an unknown, disabled or rotated one is a
    401 even where keys are optional (serving it as anonymous would hide a revoked key). Where keys are optional, a
    bearer token that is not a Prism key is anonymous: the OpenAI SDK will not start without some `api_key`, and
    placeholders like "not-needed" are what its users put there. The key is never echoed back."""
    if mode == "off":
        return OPEN_CALLER
    key = bearer_key(authorization)
    if key is not None and mode == "optional" and not key.startswith(KEY_PREFIX):
        key = None
    if key is None:
        if mode == "required":
            raise Unauthorized("this deployment requires an API key: send `Authorization: Bearer <key>` (keys are "
                               "made with `python -m graph.keys create`)", param="Authorization")
        return ANONYMOUS_CALLER
    info = lookup(key) if key.startswith(KEY_PREFIX) else None  # a foreign token is never looked up
    if info is None:
        raise Unauthorized("the API key is not valid (unknown, or rotated)", param="Authorization")
    if info.disabled:
        raise Unauthorized(f"the API key {info.key_id} is disabled", param="Authorization")
    return Caller(tenant=info.tenant, user_tier=info.user_tier, key=info, admin=info.admin,
                  trusted_tier=info.gateway)


def served_tier(caller: Caller, body_tier: str, body_set: bool) -> tuple[str, bool]:
    """(the user tier a request is served, budgeted and prioritised as; whether the body's `user_tier` was ignored).
    Only a gateway key (or auth off) may say which tier its request is: for anyone else the key decides."""
    if caller.trusted_tier:
        return body_tier, False
    return caller.user_tier, body_set


def can_see(caller: Caller, record_tenant: str | None) -> bool:
    """Records, images and replays belong to their tenant; records made before keys existed are anonymous."""
    return caller.admin or (record_tenant or ANONYMOUS) == caller.tenant


def require_admin(caller: Caller, what: str) -> None:
    """The operator routes (policy, canary, every tenant's stats): admin keys only."""
    if caller.admin:
        return
    if caller.anonymous:
        raise Unauthorized(f"{what} needs an admin API key (`python -m graph.keys create --admin ...`)",
                           param="Authorization")
    raise Forbidden(f"{what} needs an admin API key; key {caller.key_id} is not one", param="Authorization")


@dataclass(frozen=True)
class Authenticator:
    """What the HTTP edge needs to name a request's caller (graph/http.py): the mode and the store's key lookup."""

    mode: str
    lookup: KeyLookup | None = None

    def caller(self, authorization: str | None, path: str) -> Caller:
        """The caller, or a PrismError (401) to answer with. The playground page, health and the API docs are open
        to all; an image link may come without a key (its handler checks the link's signature instead)."""
        open_path = path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)
        mode = "optional" if self.mode == "required" and (open_path or path.endswith(LINK_SUFFIX)) else self.mode
        try:
            return resolve_caller(mode, authorization, self.lookup or (lambda key: None))
        except Unauthorized:
            if open_path:  # a stale key must not take /healthz down for a load balancer that forwards it
                return ANONYMOUS_CALLER
            raise


OPEN_PATHS = frozenset({"/", "/healthz", "/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"})
OPEN_PREFIXES = ("/static/",)
LINK_SUFFIX = "/image.png"


# ---- signed image links ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Links:
    """Image links of this deployment: signed when the store has a secret (always, with records), plain otherwise."""

    secret: bytes | None = None
    ttl_s: float = 3600.0

    def url(self, base: str, rid: str, index: int, now: float | None = None) -> str:
        if self.secret is None:
            return f"{base}/v1/renders/{rid}/image.png?index={index}"
        return f"{base}/v1/renders/{rid}/image.png?{sign_link(self.secret, rid, index, self.ttl_s, now)}"


def _mac(secret: bytes, rid: str, index: int, expires: int) -> str:
    msg = f"{rid}\n{index}\n{expires}".encode()
    return base64.urlsafe_b64encode(hmac.new(secret, msg, hashlib.sha256).digest()).decode().rstrip("=")


def sign_link(secret: bytes, rid: str, index: int, ttl_s: float, now: float | None = None) -> str:
    """The query string of an image link that works without a key until it expires: unguessable (HMAC-SHA256 over
    the render id, the image index and the expiry, with the store's secret) so an <img> tag or the OpenAI SDK's url
    flow needs no header."""
    expires = int((time.time() if now is None else now) + ttl_s)
    return f"index={index}&expires={expires}&sig={_mac(secret, rid, index, expires)}"


def check_link(secret: bytes, rid: str, index: int, expires: int | None, sig: str | None,
               now: float | None = None) -> None:
    """Raise unless (expires, sig) is a link this store signed for this image and it has not expired."""
    if expires is None or not sig:
        raise Unauthorized("this image needs an API key that may see the render, or a signed link (`expires` and "
                           "`sig`, from response_format \"url\" or the render record's image_urls)", param="sig")
    if not hmac.compare_digest(_mac(secret, rid, index, expires), sig):
        raise Forbidden("the image link's signature does not match (altered or not issued here)", param="sig")
    if (time.time() if now is None else now) >= expires:
        raise Forbidden(f"the image link expired at {expires} (unix seconds); ask the render record for a new one",
                        param="expires")


# ---- a key's own limits ---------------------------------------------------------------------------------------

RATE_WINDOW_S = 60.0  # `rpm` counts renders started in the last minute (a sliding window, not a calendar minute)


@dataclass(frozen=True)
class KeyUsage:
    """What the store counted for one key when its next render asked to start."""

    hits: int  # renders started in the last RATE_WINDOW_S
    oldest_hit: float | None  # when the oldest of them started (unix s)
    inflight: int  # renders running now
    spent_usd: float  # cost of its renders in its budget window


def limit_refusal(info: KeyInfo, usage: KeyUsage, now: float) -> RateLimitedRefusal | None:
    """Why a key's render may not start now, and when to come back; None: it may. Checked before any model work,
    with counts the store keeps across every ingress replica (graph/keys.py, one transaction)."""
    if info.rpm is not None and usage.hits >= info.rpm:
        back = (usage.oldest_hit + RATE_WINDOW_S - now) if usage.oldest_hit is not None else RATE_WINDOW_S
        return RateLimitedRefusal("rpm", f"key {info.key_id} may start {info.rpm} renders per minute and started "
                                  f"{usage.hits} in the last {RATE_WINDOW_S:.0f} s", max(1.0, back))
    if info.concurrent is not None and usage.inflight >= info.concurrent:
        return RateLimitedRefusal("concurrent", f"key {info.key_id} may run {info.concurrent} renders at once and "
                                  f"{usage.inflight} are running", 1.0)
    if info.budget_usd is not None and usage.spent_usd >= info.budget_usd:
        return RateLimitedRefusal("budget", f"key {info.key_id} spent ${usage.spent_usd:.4f} of its "
                                  f"${info.budget_usd:.4f} budget per {info.budget_window_s:.0f} s",
                                  min(info.budget_window_s, 3600.0))
    return None


@dataclass(frozen=True)
class RateLimitedRefusal:
    limit: str  # rpm | concurrent | budget
    message: str
    retry_after_s: float

    def error(self) -> PrismError:
        """The 429 to answer with: a spent budget is `budget_exceeded`, as a user tier's is; the rest
        `rate_limit_exceeded`. Either names the limit and says when to come back."""
        if self.limit == "budget":
            return BudgetExceeded(self.message, param="Authorization", retry_after_s=self.retry_after_s)
        return RateLimited(self.message, param="Authorization", retry_after_s=self.retry_after_s)


def apply_caller(req: GenerationRequest, caller: Caller, from_body: bool = True) -> list[str]:
    """Set the request's user tier to the one it is served as; the body fields that were ignored (to report)."""
    tier, ignored = served_tier(caller, req.user_tier, from_body and "user_tier" in req.model_fields_set)
    req.user_tier = tier
    return ["user_tier"] if ignored else []
