"""Whom an encrypted upstream (DoT, DoH, DoQ) trusts, and saying so when its certificate is refused.

A resolver on a private network usually has a certificate from a private CA. Before ``?ca=`` the only way
to use one was ``verify=false``, which also accepts anyone who intercepts the connection. ``?ca=PATH``
makes that CA the *only* trust anchor of that upstream (the system store is not consulted: a private
resolver has no business presenting a public certificate), and the name checked stays the URL's host.

The file is checked when the profile is loaded (:func:`check_ca_file`), so a typo in the path is refused
by ``dnsgate check`` instead of turning into SERVFAIL for every query. At run time a refused certificate
is reported with the upstream, the name that was checked, the CA and the reason
(:func:`describe_tls_failure`): "TLS failed" alone sends people to ``verify=false``.
"""

from __future__ import annotations

import re
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from plugins.dns_filter.upstream_url import UpstreamUrl

#: aioquic closes a connection with ``CRYPTO_ERROR + alert`` (RFC 9001 §4.8) when TLS fails.
_QUIC_CRYPTO_ERRORS = range(0x100, 0x200)
_SSL_LOCATION = re.compile(r"\s*\(_ssl\.c:\d+\)$")


class CaFileError(ValueError):
    """A ``ca=`` file that cannot serve as a trust anchor; the message is the reason alone."""


class TlsRefused(Exception):
    """A transport learned why TLS refused the certificate some other way than an ``ssl`` exception
    (DoQ: aioquic's close event); the message is the whole log reason."""


def check_ca_file(path: str) -> None:
    """Refuse a ``ca=`` path that is not absolute, missing, unreadable or holds no usable PEM certificate.

    Loaded with the same OpenSSL that will use it, so what passes here also loads at connect time.
    Absolute only: the engine runs from wherever systemd or a shell put it, and a relative path would
    silently mean a different file there.
    """
    if not Path(path).is_absolute():
        raise CaFileError("must be an absolute path")
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise CaFileError("no such file") from None
    except IsADirectoryError:
        raise CaFileError("is a directory; give one PEM file with the CA certificate(s)") from None
    except OSError as error:
        raise CaFileError(f"cannot be read: {error.strerror or error}") from None
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise CaFileError("holds no PEM certificate (no '-----BEGIN CERTIFICATE-----' line)")
    try:
        ssl.create_default_context(cadata=data.decode("ascii"))
    except UnicodeDecodeError:
        raise CaFileError("is not a PEM file (not ASCII text)") from None
    except (ssl.SSLError, ValueError) as error:
        raise CaFileError(f"is not a readable PEM certificate: {_ssl_text(error)}") from None


def trust_label(url: UpstreamUrl) -> str:
    """The trust anchor ``url`` is verified against, as the log names it."""
    if not url.verify:
        return "none (verify=false)"
    if url.ca:
        return url.ca
    if url.scheme == "quic":
        return "aioquic's default store (certifi)"  # aioquic does not read the system store
    return "system store"


def client_context(url: UpstreamUrl) -> ssl.SSLContext:
    """The TLS client context for a DoT or DoH upstream: its ``ca`` file only, the system store, or no
    verification at all (``verify=false``). Built once per upstream (loading a store costs milliseconds)."""
    if not url.verify:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    if url.ca:
        return ssl.create_default_context(cafile=url.ca)  # a cafile replaces the default store
    return ssl.create_default_context()


def quic_verify(url: UpstreamUrl) -> bool | str:
    """dnspython's ``verify`` for DoQ: the CA file's path, or whether to verify against aioquic's store."""
    return url.ca if url.verify and url.ca else url.verify


def describe_tls_failure(url: UpstreamUrl, error: BaseException) -> str | None:
    """The log reason for ``error`` if it is a refused certificate (anywhere in its cause chain), else None."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, TlsRefused):
            return str(current)
        if isinstance(current, ssl.SSLCertVerificationError):
            return refused(url, current.verify_message or _ssl_text(current))
        current = current.__cause__ or current.__context__
    return None


def describe_quic_close(url: UpstreamUrl, connection: Any) -> str | None:
    """Why a DoQ connection closed, if TLS closed it: dnspython only raises ``UnexpectedEOF``, while the
    reason (``self-signed certificate``, ``hostname ... doesn't match``) is on aioquic's close event."""
    quic = getattr(connection, "_connection", None)  # dnspython's wrapper -> aioquic's QuicConnection
    event = getattr(quic, "_close_event", None)
    code = getattr(event, "error_code", None)
    if not isinstance(code, int) or code not in _QUIC_CRYPTO_ERRORS:
        return None
    return refused(url, str(getattr(event, "reason_phrase", "") or f"TLS alert {code - 0x100}"))


def refused(url: UpstreamUrl, reason: str) -> str:
    """One wording for every transport, so a log search finds them all."""
    return f"TLS certificate refused (name checked: {url.host}, CA: {trust_label(url)}): {reason}"


def _ssl_text(error: BaseException) -> str:
    return _SSL_LOCATION.sub("", str(error))
