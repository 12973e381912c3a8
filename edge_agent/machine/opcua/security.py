"""The gateway's OPC UA application certificate and the trust it places in server certificates.

Layout of ``security.pki`` (the usual OPC UA PKI folders, so integrators find their way)::

    own/cert.der, own/key.pem   the gateway's certificate, generated on first start
    trusted/                    server certificates (DER or PEM) the gateway accepts
    rejected/                   server certificates it refused, saved so that an integrator can
                                inspect one and move it to trusted/

A server is trusted when its certificate's thumbprint is pinned in the config or the certificate
is in ``trusted/``, and it is within its validity period. The folder is read at every connect: a
certificate dropped in is used at the next attempt, without a restart.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
from datetime import UTC, datetime
from pathlib import Path

from asyncua import Client, ua
from asyncua.crypto import cert_gen, security_policies
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ...errors import MachineError
from .models import OpcUaSecurity, OpcUaSettings


def default_application_uri() -> str:
    return f"urn:{socket.gethostname()}:edge-agent"


async def own_certificate(security: OpcUaSecurity) -> tuple[Path, Path, str]:
    """(certificate, private key, application URI) of the gateway, generating them if needed.

    A given certificate is used as is and its application URI is taken from it: a client whose
    ApplicationUri differs from its certificate's is refused by compliant servers.
    """
    if security.certificate is not None and security.private_key is not None:
        cert = _load(security.certificate)
        uris = _uris(cert)
        if not uris:
            raise MachineError(
                f"certificate {security.certificate} has no application URI (SubjectAltName URI)",
                retryable=False,
            )
        if security.application_uri is not None and security.application_uri not in uris:
            raise MachineError(
                f"application_uri {security.application_uri} is not the one in certificate "
                f"{security.certificate} ({', '.join(uris)})",
                retryable=False,
            )
        return security.certificate, security.private_key, security.application_uri or uris[0]
    uri = security.application_uri or default_application_uri()
    own = security.pki / "own"
    own.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = own / "cert.der", own / "key.pem"
    # Regenerates only when missing, expired or made for another application URI / host name.
    await cert_gen.setup_self_signed_certificate(
        key_path,
        cert_path,
        uri,
        socket.gethostname(),
        [ExtendedKeyUsageOID.CLIENT_AUTH],
        {"organizationName": "edge-agent"},
    )
    key_path.chmod(0o600)
    return cert_path, key_path, uri


def check_server_certificate(der: bytes, security: OpcUaSecurity, device: str) -> None:
    """Raise MachineError naming the certificate unless the server is trusted."""
    cert = x509.load_der_x509_certificate(der)
    sha1 = hashlib.sha1(der).hexdigest()
    sha256 = hashlib.sha256(der).hexdigest()
    name = _common_name(cert)
    now = datetime.now(UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise MachineError(
            f"server certificate '{name}' (SHA-1 {sha1}) is not valid now: valid "
            f"{cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d}",
            device=device,
            retryable=False,
        )
    pinned = security.server_thumbprint
    if pinned is not None:
        if pinned in (sha1, sha256):
            return
        raise MachineError(
            f"server certificate '{name}' has SHA-1 thumbprint {sha1}, not the pinned "
            f"server_thumbprint {pinned}: another server, or its certificate was replaced",
            device=device,
            retryable=False,
        )
    trusted_dir = security.pki / "trusted"
    if der in {c.public_bytes(Encoding.DER) for c in _certificates(trusted_dir)}:
        return
    rejected = security.pki / "rejected" / f"{_file_name(name)} [{sha1}].der"
    try:
        rejected.parent.mkdir(parents=True, exist_ok=True)
        rejected.write_bytes(der)
        saved = f"saved as {rejected}; move it to {trusted_dir}/ to trust it"
    except OSError as err:
        saved = f"could not be saved to {rejected.parent}: {err.strerror}"
    raise MachineError(
        f"server certificate '{name}' (SHA-1 {sha1}) is not trusted: {saved}, "
        f"or pin it with security.server_thumbprint: {sha1}",
        device=device,
        retryable=False,
    )


def thumbprint(der: bytes) -> str:
    """The OPC UA thumbprint of a certificate: SHA-1 of its DER bytes, in hex."""
    return hashlib.sha1(der).hexdigest()


def _certificates(folder: Path) -> list[x509.Certificate]:
    found: list[x509.Certificate] = []
    if not folder.is_dir():
        return found
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in (".der", ".pem", ".crt", ".cer"):
            try:
                found.append(_load(path))
            except (OSError, ValueError):
                continue  # not a certificate: ignored, like any stray file in the folder
    return found


def _load(path: Path) -> x509.Certificate:
    data = path.read_bytes()
    if data.lstrip().startswith(b"-----BEGIN"):
        return x509.load_pem_x509_certificate(data)
    return x509.load_der_x509_certificate(data)


def _uris(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(san.value.get_values_for_type(x509.UniformResourceIdentifier))


def _common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else cert.subject.rfc4514_string()


def _file_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.@" else "_" for c in name)[:80]


_POLICY = {"Basic256Sha256": security_policies.SecurityPolicyBasic256Sha256}
_MODE = {
    "None": ua.MessageSecurityMode.None_,
    "Sign": ua.MessageSecurityMode.Sign,
    "SignAndEncrypt": ua.MessageSecurityMode.SignAndEncrypt,
}
_POLICY_NONE_URI = "http://opcfoundation.org/UA/SecurityPolicy#None"


class SecureChannel:
    """Part of ``OpcUaDriver``: the endpoint of the configured security, and the channel's trust."""

    settings: OpcUaSettings
    device: str

    async def _select_endpoint(self, client: Client) -> ua.EndpointDescription:
        sec = self.settings.security
        endpoints = await asyncio.wait_for(
            client.connect_and_get_server_endpoints(), timeout=self.settings.timeout * 2
        )
        policy_uri = _POLICY_NONE_URI if sec.policy == "None" else _POLICY[sec.policy].URI
        token = _token_type(self.settings)
        offered = []
        for ep in endpoints:
            offered.append(f"{ep.SecurityPolicyUri.rpartition('#')[2]}/{ep.SecurityMode.name}")
            if ep.SecurityPolicyUri == policy_uri and ep.SecurityMode == _MODE[sec.mode]:
                tokens = [t.TokenType for t in ep.UserIdentityTokens]
                if token not in tokens:
                    names = ", ".join(t.name for t in tokens) or "none"
                    raise MachineError(
                        f"endpoint {sec.policy}/{sec.mode} does not accept {token.name} "
                        f"identities (it accepts: {names})",
                        device=self.device,
                        retryable=False,
                    )
                return ep
        raise MachineError(
            f"the server offers no endpoint with security {sec.policy}/{sec.mode} "
            f"(offered: {', '.join(sorted(set(offered)))})",
            device=self.device,
            retryable=False,
        )

    async def _secure(self, client: Client, endpoint: ua.EndpointDescription) -> None:
        sec = self.settings.security
        if sec.policy == "None":
            return
        server_der = _first_certificate(endpoint.ServerCertificate)
        check_server_certificate(server_der, sec, self.device)
        cert, key, uri = await own_certificate(sec)
        client.application_uri = uri
        await client.set_security(
            _POLICY[sec.policy],
            certificate=str(cert),
            private_key=str(key),
            server_certificate=server_der,
            mode=_MODE[sec.mode],
        )


def _token_type(settings: OpcUaSettings) -> ua.UserTokenType:
    if settings.username is not None:
        return ua.UserTokenType.UserName
    if settings.user_certificate is not None:
        return ua.UserTokenType.Certificate
    return ua.UserTokenType.Anonymous


def _first_certificate(der: bytes) -> bytes:
    # A server may send its certificate followed by its chain; the first DER SEQUENCE is its own.
    if len(der) > 4 and der[0] == 0x30 and der[1] == 0x82:
        return der[: int.from_bytes(der[2:4], "big") + 4]
    return der
