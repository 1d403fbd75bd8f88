"""C2PA content credentials: a signed manifest inside PNG and WAV outputs (optional: c2pa-python).

The manifest (C2PA 2.x, written and read by the `c2pa-python` bindings of the c2pa-rs SDK) holds:

- `c2pa.actions`: one `c2pa.created` action whose `digitalSourceType` is IPTC's
  trainedAlgorithmicMedia ("created by a model trained on sampled content") and whose
  `softwareAgent` is AIGC Studio;
- `org.aigc.generation`: our provenance record (`aigc.safety.provenance.make_record`: kind,
  model@version, model hash, parameters, seed, prompt, time, watermark key id).

The claim covers the file's bytes (a hard binding): any change after signing, even of a PNG text
chunk, makes the manifest invalid.

Certificates: C2PA refuses a self-signed signing certificate, so `init_cert` makes a small local
chain under `$AIGC_HOME/c2pa/` on first use: a CA (`ca.pem`; its key is used once and not kept)
and an ES256 (P-256) signing certificate issued by it (`signer.pem` = signer + CA, `signer.key`,
mode 0600) with the extensions the C2PA certificate profile asks for: key usage
digitalSignature (critical), extended key usage emailProtection + documentSigning, not a CA,
subject and authority key identifiers. It is a *test* identity: readers elsewhere report the
manifest valid but the signer untrusted; here the local CA is a trust anchor, so our own files
read back as trusted. For public use, put a certificate from a C2PA-trusted CA in its place.

Reading never touches the network (no OCSP, no remote manifests), so the server can check uploads.
"""

from __future__ import annotations

import datetime
import io
from pathlib import Path
from typing import Any

from aigc.errors import AigcError
from aigc.utils.io import building_dir
from aigc.utils.paths import aigc_home

INSTALL_HINT = "install aigc[c2pa] (pip install c2pa-python)"
CERT_DIR = "c2pa"  # under $AIGC_HOME
ASSERTION = "org.aigc.generation"
SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
SIGNER_DAYS = 365
CA_DAYS = 3650
MIME = {".png": "image/png", ".wav": "audio/wav"}  # what we sign
READ_MIME = {**MIME, ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp", ".mp3": "audio/mpeg"}
EMAIL_PROTECTION, DOCUMENT_SIGNING = "1.3.6.1.5.5.7.3.4", "1.3.6.1.5.5.7.3.36"


def available() -> bool:
    """True when c2pa-python is installed."""
    try:
        import c2pa  # noqa: F401
    except ImportError:
        return False
    return True


def require():
    """The c2pa module, or an AigcError saying how to install it."""
    try:
        import c2pa
    except ImportError:
        raise AigcError(f"C2PA signing needs the c2pa-python package: {INSTALL_HINT}") from None
    return c2pa


def cert_dir() -> Path:
    return aigc_home() / CERT_DIR


# ---------------------------------------------------------------------------- certificates


def init_cert(force: bool = False) -> Path:
    """Create the local test CA + signing certificate under `$AIGC_HOME/c2pa/` (kept if present
    and valid for another day, unless `force`); returns the directory. The three files appear
    together or not at all."""
    require()  # cryptography comes with c2pa-python
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID, ObjectIdentifier

    d = cert_dir()
    now = datetime.datetime.now(datetime.timezone.utc)
    if (d / "signer.pem").is_file() and (d / "signer.key").is_file() and not force:
        leaf = x509.load_pem_x509_certificates((d / "signer.pem").read_bytes())[0]
        if leaf.not_valid_after_utc > now + datetime.timedelta(days=1):
            return d  # else it expires within a day: make a new chain
    start = now - datetime.timedelta(minutes=5)  # tolerate a little clock skew

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "AIGC Studio (local test)")])  # fmt: skip

    # 1. the CA: may sign certificates, nothing else
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name("AIGC Studio local test CA")
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    # 2. the signer: the C2PA profile (digitalSignature, a signing EKU, not a CA, key identifiers)
    key = ec.generate_private_key(ec.SECP256R1())
    eku = x509.ExtendedKeyUsage([ObjectIdentifier(EMAIL_PROTECTION), ObjectIdentifier(DOCUMENT_SIGNING)])
    signer = (
        x509.CertificateBuilder().subject_name(name("AIGC Studio local signer")).issuer_name(ca_name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(now + datetime.timedelta(days=SIGNER_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(eku, critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    with building_dir(d) as stage:
        (stage / "ca.pem").write_bytes(ca.public_bytes(pem))
        (stage / "signer.pem").write_bytes(signer.public_bytes(pem) + ca.public_bytes(pem))
        key_file = stage / "signer.key"
        key_file.touch(mode=0o600)
        key_file.write_bytes(key_pem)
    return d


def _key_usage(digital_signature: bool = False, cert_sign: bool = False):
    from cryptography import x509

    return x509.KeyUsage(digital_signature=digital_signature, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign,
                         crl_sign=cert_sign, encipher_only=False, decipher_only=False)  # fmt: skip


def _context(c2pa):
    """Settings for reading and signing: no thumbnail, no network, our CA as a trust anchor."""
    ca = cert_dir() / "ca.pem"
    settings: dict[str, Any] = {
        "builder": {"thumbnail": {"enabled": False}},  # a JPEG preview would add ~30 KB per file
        "verify": {"ocsp_fetch": False, "remote_manifest_fetch": False},
    }
    if ca.is_file():
        settings["trust"] = {"trust_anchors": ca.read_text(encoding="ascii")}
    return c2pa.Context.from_dict(settings)


# ---------------------------------------------------------------------------- signing


def manifest(record: dict[str, Any], title: str) -> dict[str, Any]:
    """The manifest definition for one output's provenance record."""
    from aigc import __version__

    agent = {"name": "AIGC Studio", "version": __version__}
    created = {"action": "c2pa.created", "digitalSourceType": SOURCE_TYPE, "softwareAgent": agent}
    return {
        "claim_generator_info": [agent],
        "title": title,
        "assertions": [
            {"label": "c2pa.actions", "data": {"actions": [created]}},
            {"label": ASSERTION, "data": record},
        ],
    }


def sign_bytes(data: bytes, mime: str, record: dict[str, Any], title: str = "output") -> bytes:
    """`data` (a PNG or WAV file's bytes) with a signed manifest embedded (certificate: `init_cert`)."""
    c2pa = require()
    if mime not in MIME.values():
        raise AigcError(f"C2PA signing of {mime} is not supported; allowed: {', '.join(MIME.values())}")
    d = init_cert()
    info = c2pa.C2paSignerInfo(
        c2pa.C2paSigningAlg.ES256, (d / "signer.pem").read_bytes(), (d / "signer.key").read_bytes(), None
    )
    out = io.BytesIO()
    try:
        with (
            c2pa.Signer.from_info(info) as signer,
            c2pa.Builder(manifest(record, title), context=_context(c2pa)) as b,
        ):
            b.sign(signer, mime, io.BytesIO(data), out)
    except c2pa.C2paError as e:
        raise AigcError(f"C2PA signing failed ({e}); check the certificate in {d} or run `aigc c2pa init-cert --force`") from None  # fmt: skip
    return out.getvalue()


def sign_file(path: str | Path, record: dict[str, Any]) -> Path:
    """Sign a PNG / WAV in place (atomic: the file is replaced only once signed)."""
    from aigc.utils.io import atomic_write_bytes

    p = Path(path)
    mime = MIME.get(p.suffix.lower())
    if mime is None:
        raise AigcError(f"C2PA signing of {p.name} is not supported; allowed: {', '.join(MIME)} files")
    return atomic_write_bytes(p, sign_bytes(p.read_bytes(), mime, record, title=p.name))


# ---------------------------------------------------------------------------- reading


def read(path: str | Path) -> dict[str, Any]:
    """The C2PA status of a file: `status` none | valid | invalid | not checked, and for a manifest
    the signer, issuer, trusted (chains to a trust anchor: our local CA), digital source type, our
    `org.aigc.generation` assertion, the validation state and failure codes."""
    p = Path(path)
    try:
        import c2pa
    except ImportError:
        return {"status": "not checked", "detail": INSTALL_HINT}
    mime = READ_MIME.get(p.suffix.lower()) or _sniff(p)
    if mime is None:
        return {"status": "none", "detail": f"C2PA is not read from {p.suffix or 'extensionless'} files here"}
    try:
        with open(p, "rb") as f:
            reader = c2pa.Reader.try_create(mime, f, context=_context(c2pa))
            if reader is None:
                return {"status": "none"}
            with reader:
                state = reader.get_validation_state()  # "Invalid" | "Valid" | "Trusted"
                results = reader.get_validation_results() or {}
                active = reader.get_active_manifest() or {}
    except c2pa.C2paError as e:  # a manifest store that cannot be parsed: as good as a broken seal
        return {"status": "invalid", "detail": " ".join(str(e).split())[:300]}
    failures = [f.get("code") for f in (results.get("activeManifest") or {}).get("failure", [])]
    sig = active.get("signature_info") or {}
    assertions = {a.get("label"): a.get("data") for a in active.get("assertions", [])}
    actions = (assertions.get("c2pa.actions.v2") or assertions.get("c2pa.actions") or {}).get("actions", [])
    return {
        "status": "invalid" if state == "Invalid" else "valid",
        "trusted": state == "Trusted",
        "validation_state": state,
        "failures": failures,
        "signer": sig.get("common_name"),
        "issuer": sig.get("issuer"),
        "digital_source_type": next((a.get("digitalSourceType") for a in actions if a.get("digitalSourceType")), None),
        "generator": [g.get("name") for g in active.get("claim_generator_info", [])],
        "aigc": assertions.get(ASSERTION),
    }  # fmt: skip


def _sniff(p: Path) -> str | None:
    with open(p, "rb") as f:
        head = f.read(12)
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "audio/wav"
    if head[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    return None


def summary(report: dict[str, Any]) -> str:
    """One line for `aigc verify`."""
    s = report.get("status")
    if s in ("none", "not checked"):
        return s + (f" ({report['detail']})" if report.get("detail") else "")
    if s == "invalid" and not report.get("signer"):
        return f"invalid ({report.get('detail', 'unreadable manifest')})"
    trust = "trusted (local CA)" if report.get("trusted") else "signer not trusted here"
    source = (report.get("digital_source_type") or "no source type").rsplit("/", 1)[-1]
    if s == "invalid":  # the seal is broken: trust in the signer no longer matters
        return f"invalid, signed by {report.get('signer')}; failures: {', '.join(report.get('failures') or ['?'])}"
    return f"valid, signed by {report.get('signer')} ({report.get('issuer')}), {trust}, {source}"
