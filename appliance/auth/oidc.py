"""Single sign-on to the web UI through an OpenID Provider: the authorization code flow with PKCE (S256). No HTTP
server code in here; `appliance.admin.oidc_routes` is the thin layer over it.

* The provider's endpoints and keys come from discovery (`<issuer>/.well-known/openid-configuration`, whose
  `issuer` must be the configured one) and its `jwks_uri`, fetched again when an ID token names a key not seen yet.
* `begin` makes a random state, nonce and PKCE verifier and seals them (AES-GCM under a key derived from the master
  key) into a short-lived cookie, so that the server keeps nothing per pending sign-in and the callback is bound to
  the browser that started it.
* `finish` checks the state (against the sealed cookie's), the `iss` of the response (RFC 9207) when sent, swaps
  the code for tokens with the verifier, and validates the ID token with authlib's `CodeIDToken` over joserfc:
  signature by the provider's JWKS, `iss`, `aud`, `exp`, `iat`, `nonce`, `azp` and `at_hash`. Claims that the ID
  token lacks (a provider may release groups at its userinfo endpoint only) are read from userinfo, whose `sub`
  must match.
* A user is linked to the provider by (issuer, sub): created at their first sign-in (audited), their role set again
  at each sign-in from `role_claim` through `role_map` (audited when it changes). The session is the same kind a
  password login makes (`SessionService`), and it keeps the ID token for signing out at the provider.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import msgspec
from authlib.common.security import generate_token
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from authlib.oidc.core import CodeIDToken
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from joserfc import jwt
from joserfc.errors import InvalidKeyIdError, JoseError
from joserfc.jwk import KeySet
from joserfc.jws import JWSRegistry

from appliance.auth.sessions import LoginService, NewSession
from appliance.auth.users import NAME_RE, User, UserService
from appliance.config import ConfigError, OidcSettings
from appliance.errors import ApplianceError, InvalidRequest
from appliance.logs import get_logger

log = get_logger(__name__)

OIDC_SECRET = "client"  # noqa: S105 (a file name, not a secret): the client secret's name in keys/oidc/ (`appliance oidc set-secret`)
PENDING_SECONDS = 600  # a sign-in must come back from the provider within ten minutes
LEEWAY_SECONDS = 60  # clock skew allowed between the provider and this box for exp/iat
_SEAL_LABEL = b"appliance/oidc-state/v1"
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
_NAME_CHARS = re.compile(r"[^A-Za-z0-9._@-]+")
ASYMMETRIC = ("RS", "PS", "ES", "EdDSA", "Ed25519", "Ed448")  # JWS algorithm names an ID token may be signed with


class SignInRefused(ApplianceError):
    """A single sign-on that cannot complete. `code` names the reason for the UI (`oidc_state_mismatch` ...)."""

    status_code = 400
    error_type = "invalid_request_error"


class ProviderUnavailable(SignInRefused):
    """The provider did not answer as it should (down, wrong URL, not an OpenID Provider)."""

    status_code = 502
    error_type = "server_error"
    code = "oidc_unavailable"


class PendingSignIn(msgspec.Struct, frozen=True):
    """What `begin` keeps for `finish`, sealed in the browser's cookie."""

    state: str
    nonce: str
    verifier: str
    redirect_uri: str
    at: float


def check_settings(settings: OidcSettings, roles: Collection[str]) -> None:
    """Stop the start with one clear line when the `[oidc]` settings cannot work."""
    if not settings.issuer:
        if not settings.local_passwords:
            raise ConfigError("oidc.local_passwords = false needs oidc.issuer: without a provider nobody could sign "
                              "in to the web UI")
        return
    parts = urlsplit(settings.issuer)
    if parts.scheme != "https" and not (parts.scheme == "http" and parts.hostname in _LOOPBACK):
        raise ConfigError(f"oidc.issuer {settings.issuer!r} must be an https:// URL (plain http only on a loopback "
                          "address, for testing)")
    if not settings.client_id:
        raise ConfigError("oidc.issuer is set but oidc.client_id is empty; set the client id registered at the "
                          "provider")
    for role in (*settings.role_map.values(), *([settings.default_role] if settings.default_role else [])):
        if role not in roles:
            raise ConfigError(f"oidc: unknown role {role!r} in role_map or default_role; roles: {', '.join(roles)}")
    if not settings.role_map and not settings.default_role:
        raise ConfigError("oidc: with neither role_map nor default_role nobody could sign in; map a claim value to a "
                          "role, or set default_role")


def sealing_key(master_key: bytes) -> bytes:
    """The key that seals pending sign-ins: its own label, so it equals no other key derived from the master key."""
    return hmac.new(master_key, _SEAL_LABEL, hashlib.sha256).digest()


def seal(key: bytes, pending: PendingSignIn) -> str:
    nonce = secrets.token_bytes(12)
    box = AESGCM(key).encrypt(nonce, msgspec.json.encode(pending), _SEAL_LABEL)
    return base64.urlsafe_b64encode(nonce + box).decode().rstrip("=")


def unseal(key: bytes, text: str) -> PendingSignIn:
    refused = SignInRefused("this sign-in was not started in this browser, or its cookie was changed; start again "
                            "from the sign-in page", code="oidc_state_mismatch")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        plain = AESGCM(key).decrypt(raw[:12], raw[12:], _SEAL_LABEL)
        return msgspec.json.decode(plain, type=PendingSignIn)
    except (ValueError, InvalidTag, msgspec.DecodeError):
        raise refused from None


def role_for(claims: Mapping[str, Any], settings: OidcSettings) -> str | None:
    """The role that the user's `role_claim` values map to (the first `role_map` entry they hold), else the default
    role, else None (refused)."""
    value = claims.get(settings.role_claim)
    held = {value} if isinstance(value, str) else {v for v in value if isinstance(v, str)} \
        if isinstance(value, list) else set()
    for claim_value, role in settings.role_map.items():
        if claim_value in held:
            return role
    return settings.default_role or None


def username_for(claims: Mapping[str, Any], settings: OidcSettings) -> str:
    """A user name from the claims: `username_claim`, else `email`, else `sub`, made to fit NAME_RE."""
    for claim in (settings.username_claim, "email", "sub"):
        value = claims.get(claim)
        if isinstance(value, str) and value.strip():
            name = _NAME_CHARS.sub("-", value.strip())[:64].strip("-") or "user"
            if NAME_RE.fullmatch(name):
                return name
    raise SignInRefused("the provider sent no usable user name (no preferred_username, email or sub claim)",
                        code="oidc_no_username")


@dataclass
class Discovery:
    metadata: dict[str, Any]
    keys: KeySet | None = None


class OidcSignIn:
    """`begin` and `finish` a sign-in, and the provider's sign-out URL, for one configured provider."""

    def __init__(self, settings: OidcSettings, client_secret: str | None, key: bytes, users: UserService,
                 logins: LoginService, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.settings = settings
        self.client_secret = client_secret
        self.key = key
        self.users = users
        self.logins = logins
        self.transport = transport
        self.name = settings.provider_name or (urlsplit(settings.issuer).hostname or settings.issuer)
        self._discovery: Discovery | None = None

    # ---- the provider ----
    def _http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(timeout=self.settings.timeout, transport=self.transport, follow_redirects=False,
                                 headers={"accept": "application/json"})

    async def _get_json(self, url: str, what: str) -> dict[str, Any]:
        try:
            async with self._http() as http:
                response = await http.get(url)
        except httpx.HTTPError as exc:
            raise ProviderUnavailable(f"the identity provider did not answer ({what} at {url}: "
                                      f"{type(exc).__name__}); try again later or ask an admin") from None
        if response.status_code != 200:
            raise ProviderUnavailable(f"the identity provider answered {response.status_code} for its {what} ({url})")
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise ProviderUnavailable(f"the identity provider's {what} at {url} is not a JSON object")
        return body

    async def discovery(self) -> Discovery:
        """The provider's metadata, fetched once (again after a failure)."""
        if self._discovery is None:
            url = self.settings.issuer.rstrip("/") + "/.well-known/openid-configuration"
            metadata = await self._get_json(url, "discovery document")
            if metadata.get("issuer") != self.settings.issuer:
                raise ProviderUnavailable(f"the discovery document at {url} names the issuer "
                                          f"{str(metadata.get('issuer'))[:200]!r}, not {self.settings.issuer!r}; "
                                          "set oidc.issuer to exactly the provider's issuer")
            for field in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
                if not isinstance(metadata.get(field), str):
                    raise ProviderUnavailable(f"the discovery document at {url} has no {field}")
            self._discovery = Discovery(metadata)
        return self._discovery

    async def _keys(self, refresh: bool = False) -> KeySet:
        found = await self.discovery()
        if found.keys is None or refresh:
            jwks = await self._get_json(found.metadata["jwks_uri"], "signing keys (jwks_uri)")
            try:
                found.keys = KeySet.import_key_set(jwks)  # type: ignore[arg-type]
            except (JoseError, ValueError, TypeError, KeyError) as exc:
                raise ProviderUnavailable(f"the provider's signing keys cannot be read: {exc}") from None
        return found.keys

    # ---- the flow ----
    async def begin(self, redirect_uri: str) -> tuple[str, str]:
        """(the provider's authorization URL to send the browser to, the sealed cookie that goes with it)."""
        metadata = (await self.discovery()).metadata
        pending = PendingSignIn(state=generate_token(32), nonce=generate_token(32), verifier=generate_token(64),
                                redirect_uri=redirect_uri, at=time.time())
        scopes = ["openid", *(s for s in self.settings.scopes if s != "openid")]
        url = httpx.URL(metadata["authorization_endpoint"]).copy_merge_params({
            "response_type": "code", "client_id": self.settings.client_id, "redirect_uri": redirect_uri,
            "scope": " ".join(scopes), "state": pending.state, "nonce": pending.nonce,
            "code_challenge": create_s256_code_challenge(pending.verifier), "code_challenge_method": "S256"})
        return str(url), seal(self.key, pending)

    def _pending(self, params: Mapping[str, str], sealed: str | None) -> PendingSignIn:
        if not sealed:
            raise SignInRefused("this browser has no sign-in in progress (it was started elsewhere, or cookies are "
                                "blocked); start again from the sign-in page", code="oidc_state_mismatch")
        pending = unseal(self.key, sealed)
        if not hmac.compare_digest(pending.state.encode(), params.get("state", "").encode()):
            raise SignInRefused("the provider's answer does not belong to the sign-in this browser started (its "
                                "state differs); start again from the sign-in page", code="oidc_state_mismatch")
        if time.time() - pending.at > PENDING_SECONDS:
            raise SignInRefused(f"the sign-in took longer than {PENDING_SECONDS // 60} minutes; start again",
                                code="oidc_expired")
        return pending

    async def _tokens(self, code: str, pending: PendingSignIn) -> dict[str, Any]:
        metadata = (await self.discovery()).metadata
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": pending.redirect_uri,
                "code_verifier": pending.verifier}
        auth: tuple[str, str] | None = None
        methods = metadata.get("token_endpoint_auth_methods_supported") or ["client_secret_basic"]
        if self.client_secret and "client_secret_basic" in methods:
            # RFC 6749 section 2.3.1: both form-urlencoded before they go into the Basic header
            auth = (quote(self.settings.client_id, safe=""), quote(self.client_secret, safe=""))
        elif self.client_secret:
            form.update(client_id=self.settings.client_id, client_secret=self.client_secret)
        else:  # a public client: PKCE alone
            form["client_id"] = self.settings.client_id
        try:
            async with self._http() as http:
                response = await http.post(metadata["token_endpoint"], data=form, auth=auth)  # type: ignore[arg-type]
        except httpx.HTTPError as exc:
            raise ProviderUnavailable(f"the identity provider's token endpoint did not answer "
                                      f"({type(exc).__name__}); try again later") from None
        try:
            body = response.json()
        except ValueError:
            body = {}
        if response.status_code != 200 or not isinstance(body, dict) or not isinstance(body.get("id_token"), str):
            error = body.get("error", "") if isinstance(body, dict) else ""
            log.warning("oidc.token_refused", status=response.status_code, error=str(error)[:80])
            raise SignInRefused(f"the identity provider refused to issue tokens ({response.status_code} "
                                f"{str(error)[:80]}); check oidc.client_id and the client secret "
                                "(`appliance oidc set-secret`), then start again", code="oidc_token_refused")
        return body

    async def validate_id_token(self, tokens: Mapping[str, Any], nonce: str) -> dict[str, Any]:
        """The ID token's claims once its signature (by the provider's published keys, an asymmetric algorithm
        it lists), iss, aud, exp, iat, nonce, azp and at_hash hold; SignInRefused otherwise."""
        metadata = (await self.discovery()).metadata
        listed = metadata.get("id_token_signing_alg_values_supported") or ["RS256"]
        # never 'none', nor HS*: a token MACed with the client secret is not one the provider's keys vouch for
        registry = JWSRegistry(algorithms=[a for a in listed if isinstance(a, str) and a.startswith(ASYMMETRIC)])
        try:
            try:
                token = jwt.decode(tokens["id_token"], await self._keys(), registry=registry)
            except InvalidKeyIdError:  # the provider rotated its keys since they were fetched
                token = jwt.decode(tokens["id_token"], await self._keys(refresh=True), registry=registry)
            claims = CodeIDToken(token.claims, token.header,
                                 {"iss": {"essential": True, "value": self.settings.issuer},
                                  "aud": {"essential": True, "value": self.settings.client_id}},
                                 {"nonce": nonce, "client_id": self.settings.client_id,
                                  "access_token": tokens.get("access_token")})
            claims.validate(leeway=LEEWAY_SECONDS)
        except (JoseError, ValueError) as exc:
            description = getattr(exc, "description", None) or str(exc)
            log.warning("oidc.id_token_invalid", error=type(exc).__name__, detail=str(description)[:200])
            raise SignInRefused(f"the ID token from the identity provider is not valid ({type(exc).__name__}: "
                                f"{str(description)[:120]}); start again, and tell an admin if it recurs",
                                code="oidc_invalid_token") from None
        return dict(claims)

    async def _userinfo(self, tokens: Mapping[str, Any], subject: str) -> dict[str, Any]:
        endpoint = (await self.discovery()).metadata.get("userinfo_endpoint")
        if not isinstance(endpoint, str) or not isinstance(tokens.get("access_token"), str):
            return {}
        try:
            async with self._http() as http:
                response = await http.get(endpoint, headers={"authorization": f"Bearer {tokens['access_token']}"})
            info = response.json() if response.status_code == 200 else {}
        except (httpx.HTTPError, ValueError):
            info = {}
        if not isinstance(info, dict) or info.get("sub") != subject:
            return {}  # never mix in claims about someone else
        return info

    async def finish(self, params: Mapping[str, str], sealed: str | None, client: str, user_agent: str
                     ) -> NewSession:
        """Complete a sign-in from the provider's answer (the callback's query) and this browser's sealed cookie."""
        try:
            return await self._finish(params, sealed, client, user_agent)
        except SignInRefused as exc:
            self.logins.record_refusal(exc.message[:200], client, method="oidc", code=exc.code or "")
            raise

    async def _finish(self, params: Mapping[str, str], sealed: str | None, client: str, user_agent: str
                      ) -> NewSession:
        pending = self._pending(params, sealed)
        if params.get("error"):
            description = params.get("error_description", "")[:160]
            raise SignInRefused(f"the identity provider ended the sign-in: {params['error'][:80]}"
                                + (f" ({description})" if description else ""), code="oidc_denied")
        if "iss" in params and params["iss"] != self.settings.issuer:  # RFC 9207: an answer from another provider
            raise SignInRefused("the answer came from another identity provider than the one configured",
                                code="oidc_state_mismatch")
        if not params.get("code"):
            raise SignInRefused("the identity provider's answer has no authorization code", code="oidc_denied")
        tokens = await self._tokens(params["code"], pending)
        claims = await self.validate_id_token(tokens, pending.nonce)
        if any(c not in claims for c in (self.settings.role_claim, self.settings.username_claim)):
            claims = {**await self._userinfo(tokens, claims["sub"]), **claims}
        user = self._user(claims)
        return self.logins.start_linked(user, client, user_agent, tokens["id_token"], "oidc")

    def _user(self, claims: Mapping[str, Any]) -> User:
        """The linked user, created at the first sign-in, with the role the claims map to now."""
        role = role_for(claims, self.settings)
        if role is None:
            raise SignInRefused("your account at the identity provider has no role on this appliance (none of its "
                                f"'{self.settings.role_claim}' values is mapped); ask an admin for access",
                                code="oidc_no_role")
        actor = f"oidc:{self.name}"
        user = self.users.find_linked(self.settings.issuer, str(claims["sub"]))
        if user is None:
            name = username_for(claims, self.settings)
            try:
                return self.users.create_linked(name, role, self.settings.issuer, str(claims["sub"]), actor=actor)
            except InvalidRequest as exc:
                if exc.code != "user_exists":
                    raise
                raise SignInRefused(f"a user named '{name}' already exists on this appliance and is not linked to "
                                    f"{self.name}; ask an admin to rename or remove it", code="oidc_name_taken") \
                    from None
        if role != user.role:
            user = self.users.set_role(user.name, role, actor=actor)
        return user

    async def end_session_url(self, id_token: str, post_logout_redirect_uri: str) -> str | None:
        """Where to send the browser to sign out at the provider too (RP-initiated logout), when it offers that."""
        try:
            endpoint = (await self.discovery()).metadata.get("end_session_endpoint")
        except ProviderUnavailable:
            return None
        if not isinstance(endpoint, str):
            return None
        return str(httpx.URL(endpoint).copy_merge_params({
            "id_token_hint": id_token, "client_id": self.settings.client_id,
            "post_logout_redirect_uri": post_logout_redirect_uri, "state": generate_token(16)}))
