"""Kubernetes service-account tokens: how a proxy without a certificate proves who it is.

A proxy sends ``authorization: Bearer TOKEN`` on its xDS stream; :class:`KubernetesTokenReviewer`
checks the token with a TokenReview (authenticated, for audience :data:`TOKEN_AUDIENCE`, a
service account) and says whose it is. No gRPC here: the stream authorizer in
``xds_server.auth`` reads the header and asks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import aiohttp
from kubernetes.aio.client import ApiException, V1TokenReview, V1TokenReviewSpec

#: The audience a service-account token must be issued for (the injected sidecar's
#: projected token asks for it).
TOKEN_AUDIENCE: Final = "inferlane"
_SA_PREFIX: Final = "system:serviceaccount:"
_POD_NAME_EXTRA: Final = "authentication.kubernetes.io/pod-name"


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of an ``authorization: Bearer TOKEN`` header, if there is one."""
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        scheme, _, token = text.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


@dataclass(frozen=True)
class TokenIdentity:
    """Who a service-account token belongs to."""

    namespace: str
    service_account: str
    #: The pod the token was issued for (bound tokens name it); "" when not known.
    pod_name: str = ""


class TokenReviewer(Protocol):
    async def review(self, token: str) -> TokenIdentity | str:
        """The token's identity, or why it is not accepted."""
        ...


class TokenReviewApi(Protocol):
    """The one call used, as ``kubernetes.aio.client.AuthenticationV1Api`` provides it."""

    async def create_token_review(self, body: Any) -> Any: ...


class KubernetesTokenReviewer:
    """Checks tokens with a TokenReview: authenticated, for our audience, a service account."""

    def __init__(self, api: TokenReviewApi, audience: str = TOKEN_AUDIENCE) -> None:
        self.api = api
        self.audience = audience

    async def review(self, token: str) -> TokenIdentity | str:
        body = V1TokenReview(spec=V1TokenReviewSpec(token=token, audiences=[self.audience]))
        try:
            result = await self.api.create_token_review(body=body)
        except ApiException as exc:
            return f"TokenReview failed: {exc.status} {exc.reason}"
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return f"TokenReview failed: {exc}"
        status = getattr(result, "status", None)
        if status is None or not status.authenticated:
            error = getattr(status, "error", None) or "not authenticated"
            return f"token refused: {error}"
        if self.audience not in (status.audiences or ()):
            return f"token is not for audience {self.audience!r}"
        username = str(getattr(status.user, "username", "") or "")
        namespace, _, account = username.removeprefix(_SA_PREFIX).partition(":")
        if not username.startswith(_SA_PREFIX) or not namespace or not account:
            return f"token belongs to {username!r}, not a service account"
        extra: Mapping[str, Sequence[str]] = getattr(status.user, "extra", None) or {}
        pods = extra.get(_POD_NAME_EXTRA) or [""]
        return TokenIdentity(namespace, account, str(pods[0]))
