"""A minimal OpenID Connect provider for the login tests: the authorization-code flow with PKCE, RS256 id tokens.

Standard library HTTP server in a thread, plus `cryptography` (already a dependency) for the RSA key. `/authorize`
approves at once as `provider.user` (set it before each login) and sends the browser back with a code and the
state; `/token` checks the client's credentials, the code, its redirect URI and the PKCE verifier, and answers with
an access token and an id token carrying the nonce. Everything listens on 127.0.0.1 only.
"""
from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlencode, urlparse

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

CLIENT_ID, CLIENT_SECRET = "model-dashboard", "test-client-secret"
TOKEN_LIFETIME_S = 300


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def auth_section(server_metadata_url: str, redirect_uri: str = "http://localhost:{port}/oauth2callback") -> dict[str, str]:
    """The `[auth]` secrets section `st.login` reads, for this provider's client ("{port}": the app's port)."""
    return {
        "redirect_uri": redirect_uri,
        "cookie_secret": secrets.token_urlsafe(32),
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "server_metadata_url": server_metadata_url,
    }


# For AppTest runs, which never reach a provider (nothing calls st.login there): what matters is that [auth] exists.
# Port 9 (discard) on loopback: a request sent by mistake fails at once instead of waiting.
UNREACHED_AUTH_SECRETS = {"auth": auth_section("http://127.0.0.1:9/.well-known/openid-configuration")}


@dataclass(frozen=True)
class ProviderUser:
    email: str
    name: str
    email_verified: bool = True

    @property
    def sub(self) -> str:
        return hashlib.sha256(self.email.encode()).hexdigest()[:16]

    def claims(self) -> dict[str, object]:
        return {"sub": self.sub, "email": self.email, "email_verified": self.email_verified, "name": self.name}


@dataclass(frozen=True)
class _Grant:
    user: ProviderUser
    redirect_uri: str
    nonce: str | None
    code_challenge: str | None


class OidcProvider:
    """`with OidcProvider(user) as provider:` serves on a free port until the block ends; `provider.metadata_url`
    goes in `[auth] server_metadata_url`."""

    def __init__(self, user: ProviderUser) -> None:
        self.user = user
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._kid = secrets.token_hex(4)
        self._grants: dict[str, _Grant] = {}
        self._access_tokens: dict[str, ProviderUser] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.issuer = f"http://127.0.0.1:{self._server.server_address[1]}"
        self.metadata_url = f"{self.issuer}/.well-known/openid-configuration"
        self.token_requests = 0

    def __enter__(self) -> OidcProvider:
        threading.Thread(target=self._server.serve_forever, daemon=True, name="oidc-provider").start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    # --- documents ------------------------------------------------------------------------------------------
    def metadata(self) -> dict[str, object]:
        return {
            "issuer": self.issuer,
            "authorization_endpoint": f"{self.issuer}/authorize",
            "token_endpoint": f"{self.issuer}/token",
            "userinfo_endpoint": f"{self.issuer}/userinfo",
            "jwks_uri": f"{self.issuer}/jwks",
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "scopes_supported": ["openid", "email", "profile"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            "code_challenge_methods_supported": ["S256"],
        }

    def jwks(self) -> dict[str, object]:
        numbers = self._key.public_key().public_numbers()
        as_bytes = lambda value: value.to_bytes((value.bit_length() + 7) // 8, "big")  # noqa: E731
        return {"keys": [{"kty": "RSA", "use": "sig", "alg": "RS256", "kid": self._kid, "n": b64url(as_bytes(numbers.n)), "e": b64url(as_bytes(numbers.e))}]}

    def id_token(self, user: ProviderUser, nonce: str | None) -> str:
        now = int(time.time())
        claims = {"iss": self.issuer, "aud": CLIENT_ID, "iat": now, "exp": now + TOKEN_LIFETIME_S, **user.claims()}
        if nonce is not None:
            claims["nonce"] = nonce
        header = {"alg": "RS256", "typ": "JWT", "kid": self._kid}
        signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}".encode()
        signature = self._key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input.decode()}.{b64url(signature)}"

    # --- the flow -------------------------------------------------------------------------------------------
    def authorize(self, query: dict[str, str]) -> tuple[int, dict[str, str], object]:
        """Approve as the current user: a redirect to the client's redirect_uri with a code and the state."""
        if query.get("client_id") != CLIENT_ID or query.get("response_type") != "code" or "redirect_uri" not in query:
            return 400, {}, {"error": "invalid_request"}
        code = secrets.token_urlsafe(16)
        with self._lock:
            self._grants[code] = _Grant(self.user, query["redirect_uri"], query.get("nonce"), query.get("code_challenge"))
        back = {"code": code} | ({"state": query["state"]} if "state" in query else {})
        return 302, {"Location": f"{query['redirect_uri']}?{urlencode(back)}"}, None

    def token(self, form: dict[str, str], authorization: str | None) -> tuple[int, dict[str, str], object]:
        self.token_requests += 1
        client_id, client_secret = form.get("client_id"), form.get("client_secret")
        if authorization and authorization.startswith("Basic "):
            client_id, _, client_secret = base64.b64decode(authorization[6:]).decode().partition(":")
        if (client_id, client_secret) != (CLIENT_ID, CLIENT_SECRET):
            return 401, {}, {"error": "invalid_client"}
        with self._lock:
            grant = self._grants.pop(form.get("code", ""), None)  # a code is good once
        if form.get("grant_type") != "authorization_code" or grant is None or form.get("redirect_uri") != grant.redirect_uri:
            return 400, {}, {"error": "invalid_grant"}
        if grant.code_challenge is not None:
            verifier = form.get("code_verifier", "")
            if b64url(hashlib.sha256(verifier.encode()).digest()) != grant.code_challenge:
                return 400, {}, {"error": "invalid_grant", "error_description": "PKCE verifier does not match"}
        access_token = secrets.token_urlsafe(24)
        with self._lock:
            self._access_tokens[access_token] = grant.user
        return 200, {}, {
            "access_token": access_token, "token_type": "Bearer", "expires_in": TOKEN_LIFETIME_S,
            "scope": "openid email profile", "id_token": self.id_token(grant.user, grant.nonce),
        }

    def userinfo(self, authorization: str | None) -> tuple[int, dict[str, str], object]:
        with self._lock:
            user = self._access_tokens.get((authorization or "").removeprefix("Bearer "))
        return (200, {}, user.claims()) if user else (401, {}, {"error": "invalid_token"})

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                url = urlparse(self.path)
                query = {name: values[0] for name, values in parse_qs(url.query).items()}
                routes = {
                    "/.well-known/openid-configuration": lambda: (200, {}, provider.metadata()),
                    "/jwks": lambda: (200, {}, provider.jwks()),
                    "/authorize": lambda: provider.authorize(query),
                    "/userinfo": lambda: provider.userinfo(self.headers.get("Authorization")),
                }
                self._answer(*routes.get(url.path, lambda: (404, {}, {"error": "not_found"}))())

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
                form = {name: values[0] for name, values in parse_qs(body).items()}
                if urlparse(self.path).path != "/token":
                    self._answer(404, {}, {"error": "not_found"})
                    return
                self._answer(*provider.token(form, self.headers.get("Authorization")))

            def _answer(self, status: int, headers: dict[str, str], body: object) -> None:
                payload = b"" if body is None else json.dumps(body).encode()
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                if body is not None:
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Cache-Control", "no-store")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (http.server's signature)
                pass  # the test's output stays readable; failures show in the assertions

        return Handler
