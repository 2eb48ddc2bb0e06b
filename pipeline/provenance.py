"""C2PA Content Credentials on restored derivatives, with the C2PA project's own bindings (c2pa-python).

Every derivative with a restored face gets a signed manifest that binds its bytes (a hard binding: a
hash over the file outside the manifest) to what was done: the master as its parent ingredient (title,
format, and the master's sha256 from the result row, in the ingredient's metadata), the actions
``c2pa.opened`` (the master) and ``c2pa.edited`` with the IPTC digital source type
*compositeWithTrainedAlgorithmicMedia* and a software agent naming archive-restore, the GFP-GAN model and
its weights hash, and an assertion ``org.archive-restore.restoration`` with what a curator needs: each
face's box in master pixels, identity similarity, QA verdict and action, the run id and fingerprint.
The access copy gets its own manifest, with the signed derivative as its parent.

Signing is the last edit before the write; anything that edits the file afterwards breaks the binding.
The signing material (certificate chain and private key) is read once by the driver from a path, an
``s3://`` URI or an environment variable, checked (expiry, key matches certificate, extended key usage,
algorithm, a trial signature), and travels to the Compose tasks in memory only: it is never logged,
written to a result row or to a run record. Formats that carry credentials: JPEG, PNG, TIFF, WebP (BMP
cannot; such a derivative gets a note instead).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass, field

from . import __version__, storage
from .config import ProvenanceConfig, StorageConfig
from .errors import ConfigError

log = logging.getLogger(__name__)

MIME = {"JPEG": "image/jpeg", "PNG": "image/png", "TIFF": "image/tiff", "WEBP": "image/webp"}
ASSERTION = "org.archive-restore.restoration"
SHA256_KEY = "org.archive-restore.sha256"  # in the parent ingredient's metadata
AI_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/compositeWithTrainedAlgorithmicMedia"
# Extended key usages the C2PA trust model accepts for a claim signer.
_EKU_OK = {"1.3.6.1.5.5.7.3.4": "emailProtection", "1.3.6.1.5.5.7.3.36": "documentSigning",
           "1.3.6.1.4.1.62558.2.1": "c2pa claimSigning"}
_EKU_FORBIDDEN = {"2.5.29.37.0": "anyExtendedKeyUsage", "1.3.6.1.5.5.7.3.8": "timeStamping",
                  "1.3.6.1.5.5.7.3.9": "OCSPSigning"}
# The library's own settings: no thumbnails (they added ~160 KB to every file, measured), as we carry the
# master's look in the derivative itself.
_SETTINGS = {"builder": {"thumbnail": {"enabled": False}}}


class ProvenanceError(ConfigError):
    """The signing material cannot be used; the message says why (never what the key is)."""


@dataclass
class Material:
    """The signing material, in memory only; its repr shows neither the key nor the chain. ``chain`` holds
    certificates only (rebuilt from the parsed chain), ``key`` is PKCS#8."""
    chain: bytes = field(repr=False)
    key: bytes = field(repr=False)
    alg: str = "es256"
    tsa_url: str | None = None
    anchors: bytes | None = field(default=None, repr=False)

    def describe(self) -> dict:
        """What a run record may say of it: the certificate, never the key."""
        from cryptography import x509

        leaf = x509.load_pem_x509_certificates(self.chain)[0]
        return {"alg": self.alg, "subject": leaf.subject.rfc4514_string(), "issuer": leaf.issuer.rfc4514_string(),
                "not_after": leaf.not_valid_after_utc.isoformat(), "serial": str(leaf.serial_number),
                "chain_sha256": hashlib.sha256(self.chain).hexdigest(), "tsa_url": self.tsa_url}

    def not_after(self) -> dt.datetime:
        from cryptography import x509

        return min(c.not_valid_after_utc for c in x509.load_pem_x509_certificates(self.chain))

    def redact(self, text: str) -> str:
        """``text`` with any line of the key's PEM body (or its hex) replaced: for messages of other libraries."""
        body = [ln for ln in self.key.decode(errors="ignore").splitlines() if ln and not ln.startswith("-----")]
        for piece in body + [self.key.hex()[i:i + 32] for i in range(0, len(self.key.hex()), 32)]:
            if len(piece) >= 16 and piece in text:
                text = text.replace(piece, "<redacted>")
        return text


class SigningExpired(Exception):
    """The signing certificate expired during the run: every image left would fail the same way."""


def read_reference(ref: str, cfg: StorageConfig, what: str) -> bytes:
    """A path, an s3:// URI or ``env:NAME`` (settings refuse anything that looks like key material)."""
    if ref.startswith("env:"):
        value = os.environ.get(ref[4:])
        if not value:
            raise ProvenanceError(f"{what}: environment variable {ref[4:]} is not set")
        return value.encode()
    try:
        return storage.read_bytes(ref, cfg)
    except FileNotFoundError:
        raise ProvenanceError(f"{what}: {ref} not found") from None
    except Exception as e:
        raise ProvenanceError(f"{what}: cannot read {ref}: {type(e).__name__}") from None


def load(cfg: ProvenanceConfig, storage_cfg: StorageConfig) -> Material | None:
    """The checked signing material, or None when signing is off."""
    if cfg.c2pa == "off":
        return None
    if not cfg.cert_chain or not cfg.private_key:
        raise ProvenanceError("provenance.c2pa=sign needs provenance.cert_chain and provenance.private_key "
                              "(paths, s3:// URIs or env:NAME)")
    anchors = read_reference(cfg.trust_anchors, storage_cfg, "provenance.trust_anchors") if cfg.trust_anchors else None
    m = _parse(read_reference(cfg.cert_chain, storage_cfg, "provenance.cert_chain"),
               read_reference(cfg.private_key, storage_cfg, "provenance.private_key"), cfg.alg, cfg.tsa_url, anchors)
    check(m)
    return m


def _parse(chain_pem: bytes, key_pem: bytes, alg: str, tsa_url: str | None, anchors: bytes | None) -> Material:
    """Certificates only in the chain (a key block there would be embedded in every signed file), and the
    key in PKCS#8 whatever PEM form it came in (SEC1 "EC PRIVATE KEY", PKCS#1 "RSA PRIVATE KEY")."""
    import re

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    labels = set(re.findall(rb"-----BEGIN ([A-Z0-9 ]+)-----", chain_pem))
    if labels - {b"CERTIFICATE"}:
        raise ProvenanceError("provenance.cert_chain holds more than certificates ("
                              + ", ".join(sorted(x.decode() for x in labels - {b"CERTIFICATE"}))
                              + "): keep the key in its own file, or it would be embedded in every signed file")
    try:
        certs = x509.load_pem_x509_certificates(chain_pem)
    except ValueError as e:
        raise ProvenanceError(f"provenance.cert_chain is not a PEM certificate chain ({e})") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        # The exception text of a key parser could quote the key: only its type is said.
        raise ProvenanceError(f"provenance.private_key is not an unencrypted PEM private key ({type(e).__name__})") \
            from None
    pem = serialization.Encoding.PEM
    return Material(b"".join(c.public_bytes(pem) for c in certs),
                    key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
                    alg, tsa_url, anchors)


def check(m: Material, now: dt.datetime | None = None) -> None:
    """Refuse material the signature would be worthless with, saying what is wrong."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    now = now or dt.datetime.now(dt.timezone.utc)
    chain = x509.load_pem_x509_certificates(m.chain)
    key = serialization.load_pem_private_key(m.key, password=None)
    for cert in chain:
        name = cert.subject.rfc4514_string()
        if now > cert.not_valid_after_utc:
            raise ProvenanceError(f"certificate {name} expired on {cert.not_valid_after_utc:%Y-%m-%d}")
        if now < cert.not_valid_before_utc:
            raise ProvenanceError(f"certificate {name} is not valid before {cert.not_valid_before_utc:%Y-%m-%d}")
    for child, parent in zip(chain, chain[1:]):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, Exception) as e:
            raise ProvenanceError(f"provenance.cert_chain is out of order or incomplete: {child.subject.rfc4514_string()}"
                                  f" is not issued by the next certificate, {parent.subject.rfc4514_string()} "
                                  f"({type(e).__name__}); give the chain end-entity first, each issued by the next")
    leaf = chain[0]
    name = leaf.subject.rfc4514_string()
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, spki) != \
            leaf.public_key().public_bytes(serialization.Encoding.DER, spki):
        raise ProvenanceError(f"provenance.private_key is not the key of certificate {name} "
                              "(the first certificate of the chain)")
    try:
        if not leaf.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature:
            raise ProvenanceError(f"certificate {name}: its key usage does not include digitalSignature")
    except x509.ExtensionNotFound:
        raise ProvenanceError(f"certificate {name} has no key usage extension; C2PA needs digitalSignature") from None
    try:
        eku = {u.dotted_string for u in leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value}
    except x509.ExtensionNotFound:
        eku = set()
    if not eku & set(_EKU_OK):
        raise ProvenanceError(f"certificate {name} lacks an extended key usage that C2PA accepts for signing "
                              f"({', '.join(_EKU_OK.values())})")
    forbidden = eku & set(_EKU_FORBIDDEN)
    if forbidden:
        raise ProvenanceError(f"certificate {name} also has extended key usage "
                              f"{', '.join(_EKU_FORBIDDEN[u] for u in sorted(forbidden))}, which C2PA refuses for a "
                              "claim signer")
    kinds = {"es256": (ec.EllipticCurvePrivateKey, "secp256r1"), "es384": (ec.EllipticCurvePrivateKey, "secp384r1"),
             "es512": (ec.EllipticCurvePrivateKey, "secp521r1"), "ed25519": (ed25519.Ed25519PrivateKey, None)}
    kinds.update({f"ps{n}": (rsa.RSAPrivateKey, None) for n in (256, 384, 512)})
    want, curve = kinds[m.alg]
    if not isinstance(key, want) or (curve and key.curve.name != curve):
        raise ProvenanceError(f"provenance.alg={m.alg} does not fit the key ({type(key).__name__.replace('_', '')}"
                              f"{' ' + key.curve.name if isinstance(key, ec.EllipticCurvePrivateKey) else ''})")
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size < 2048:
        raise ProvenanceError(f"the RSA key has {key.key_size} bits; C2PA needs at least 2048")
    left = m.not_after() - now
    if left < dt.timedelta(days=7):
        log.warning("the signing certificate chain expires in %s (%s): a run that outlasts it stops there",
                    str(left).split(".")[0], m.not_after().isoformat())
    try:  # whatever else the library would refuse, find it now rather than on the first derivative
        trial = Signer(m, "archive-restore preflight").sign(_tiny_jpeg(), "JPEG", "preflight.jpg", _tiny_jpeg(),
                                                            "preflight.jpg", "JPEG", {"preflight": True})
    except Exception as e:
        raise ProvenanceError(f"the C2PA library cannot sign with this material: {type(e).__name__}: "
                              f"{m.redact(str(e))}") from None
    v = verify(trial, "JPEG", m.anchors)
    if not v.ok:
        raise ProvenanceError("a trial signature does not verify"
                              + (" against provenance.trust_anchors" if m.anchors else "")
                              + f" ({v.state}: {', '.join(v.failures)}): check the chain and the anchors")


def _tiny_jpeg() -> bytes:
    import cv2
    import numpy as np

    return cv2.imencode(".jpg", np.full((16, 16, 3), 128, np.uint8))[1].tobytes()


class Signer:
    """Signs derivatives in one Compose task; built once per task from the material."""

    def __init__(self, m: Material, software: str):
        import c2pa

        self.c2pa, self.software, self.expires = c2pa, software, m.not_after()
        self.signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(m.alg.encode(), m.chain, m.key, m.tsa_url))
        self.context = c2pa.Context.from_dict(_SETTINGS)

    def sign(self, data: bytes, fmt: str, title: str, parent: bytes, parent_title: str, parent_fmt: str,
             facts: dict, parent_sha256: str | None = None) -> bytes:
        """``data`` (a finished ``fmt`` file) with a manifest whose parent ingredient is ``parent``."""
        if dt.datetime.now(dt.timezone.utc) >= self.expires:
            raise SigningExpired(f"the signing certificate chain expired at {self.expires.isoformat()} during the "
                                 "run; renew it and run again (the images done so far are recorded)")
        manifest = {
            "claim_generator_info": [{"name": "archive-restore", "version": __version__}],
            "title": title, "format": MIME[fmt],
            "assertions": [
                {"label": "c2pa.actions", "data": {"actions": [
                    {"action": "c2pa.opened", "parameters": {"ingredientIds": ["parent"]}},
                    {"action": "c2pa.edited", "digitalSourceType": AI_SOURCE_TYPE,
                     "softwareAgent": {"name": self.software},
                     "description": "faces restored with a generative model (GFP-GAN)"}]}},
                {"label": ASSERTION, "data": _floats(facts)},
            ],
        }
        ingredient = {"title": parent_title, "format": MIME.get(parent_fmt, "application/octet-stream"),
                      "relationship": "parentOf", "instance_id": "parent",
                      "metadata": {SHA256_KEY: parent_sha256 or hashlib.sha256(parent).hexdigest()}}
        out = io.BytesIO()
        with self.c2pa.Builder(manifest, context=self.context) as b:
            b.add_ingredient(ingredient, MIME.get(parent_fmt, "application/octet-stream"), io.BytesIO(parent))
            b.sign(self.signer, MIME[fmt], io.BytesIO(data), out)
        return out.getvalue()


def _floats(x):
    """Numbers as floats. The library turns a flat list of numbers into a byte string (small ints read back
    as base64 text, floats as ""), so facts carry no flat numeric lists: boxes are objects (x1, y1, x2, y2)."""
    if isinstance(x, dict):
        return {k: _floats(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_floats(v) for v in x]
    return float(x) if isinstance(x, int) and not isinstance(x, bool) else x


@dataclass
class Verdict:
    state: str | None              # Valid / Trusted / Invalid, None without a manifest
    failures: list[str]            # validation failure codes
    parent_sha256: str | None
    actions: list[str]
    facts: dict | None
    anchored: bool = False         # trust anchors were given: the signer must chain to one
    signer_serial: str | None = None

    @property
    def ok(self) -> bool:
        """Signature and hard binding hold; with trust anchors the signer must also chain to one of them
        (without, ``signingCredential.untrusted`` is expected: nobody said whom to trust)."""
        if self.anchored:
            return self.state == "Trusted" and not self.failures
        return self.state in ("Valid", "Trusted") and not [f for f in self.failures
                                                           if f != "signingCredential.untrusted"]


def verify(data: bytes, fmt: str, trust_anchors: bytes | None = None) -> Verdict:
    """Read a file's credentials back and validate them (signature, hard binding, trust)."""
    import c2pa

    settings: dict = {"verify": {"verify_trust": True}}
    if trust_anchors:
        settings["trust"] = {"trust_anchors": trust_anchors.decode()}
    try:
        with c2pa.Reader(MIME[fmt], io.BytesIO(data), context=c2pa.Context.from_dict(settings)) as r:
            results = r.get_validation_results() or {}
            manifest = r.get_active_manifest() or {}
            state = r.get_validation_state()
    except Exception as e:  # no manifest at all (the library raises), or one it cannot parse
        return Verdict(None, [f"no readable manifest: {type(e).__name__}"], None, [], None)
    failures = [f["code"] for f in (results.get("activeManifest") or {}).get("failure", [])]
    parent = next((i for i in manifest.get("ingredients", []) if i.get("relationship") == "parentOf"), {})
    assertions = {a["label"]: a.get("data") for a in manifest.get("assertions", [])}
    actions = [a.get("action") for a in (assertions.get("c2pa.actions.v2") or assertions.get("c2pa.actions")
                                         or {}).get("actions", [])]
    return Verdict(state, failures, (parent.get("metadata") or {}).get(SHA256_KEY), actions, assertions.get(ASSERTION),
                   bool(trust_anchors), (manifest.get("signature_info") or {}).get("cert_serial_number"))


def format_of(name: str) -> str | None:
    from .imageio import EXTENSIONS

    return EXTENSIONS.get(os.path.splitext(name)[1].lower())


def verify_file(uri: str, cfg: StorageConfig, anchors: bytes | None, expect: dict | None = None) -> dict:
    """One file's verdict as a row for the summary. ``expect`` (from the result row and its run record):
    ``sha256`` of the file, the ``parent_sha256`` its parent ingredient must name, the ``run_id`` and
    ``image_id`` its facts must name, the ``serial`` of the certificate that signed the run."""
    fmt = format_of(uri)
    if fmt not in MIME:
        return {"uri": uri, "ok": False, "why": "not a format that carries Content Credentials"}
    try:
        data = storage.read_bytes(uri, cfg)
        v = verify(data, fmt, anchors)
    except Exception as e:
        return {"uri": uri, "ok": False, "why": f"cannot read: {type(e).__name__}: {e}"}
    e = expect or {}
    facts = v.facts or {}
    why = None
    if not v.ok:
        why = f"{v.state or 'no manifest'}: {', '.join(v.failures) or 'not trusted'}"
    elif e.get("sha256") and hashlib.sha256(data).hexdigest() != e["sha256"]:
        why = "its bytes are not those the result row recorded"
    elif e.get("parent_sha256") and v.parent_sha256 != e["parent_sha256"]:
        why = f"parent ingredient sha256 {v.parent_sha256} is not the recorded {e['parent_sha256']}"
    elif expect is not None and v.actions != ["c2pa.opened", "c2pa.edited"]:
        why = f"actions {v.actions} are not opened then edited"
    elif any(e.get(k) and facts.get(k) != e[k] for k in ("run_id", "image_id")):
        why = f"its facts name run {facts.get('run_id')} / image {facts.get('image_id')}, not the row's"
    elif e.get("serial") and v.signer_serial != e["serial"]:
        why = f"signed by certificate serial {v.signer_serial}, not the run's ({e['serial']})"
    return {"uri": uri, "ok": why is None, "state": v.state, "why": why}


def verify_output(output_root: str, cfg: StorageConfig, anchors: bytes | None) -> dict:
    """Every signed derivative and access copy of an output's latest results: signature, hard binding, the
    bytes against the row, the parent ingredient's sha256 (the master's for a derivative, the derivative's
    for its access copy), the actions, the facts' run and image, and the signer against the run record's
    certificate. The summary is also written to ``_verify/latest.json`` for ``status`` and ``report``."""
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.compute as pc

    from .ledger import load_results
    from .resume import latest_rows
    from .runs import read_records

    cols = ["image_id", "run_id", "status", "finished_at", "output_uri", "access_uri", "src_sha256", "out_sha256",
            "access_sha256", "c2pa_signed", "derived_by"]
    rows = latest_rows(load_results(output_root, cfg, columns=cols))
    if rows.num_rows and "c2pa_signed" in rows.column_names:
        rows = rows.filter(pc.fill_null(rows["c2pa_signed"], False))
    else:
        rows = rows.slice(0, 0)
    serials = {r["run_id"]: (r.get("signing") or {}).get("serial") for r in read_records(output_root, cfg)}
    jobs = []
    for r in rows.to_pylist():
        common = {"run_id": r["run_id"], "image_id": r["image_id"], "serial": serials.get(r["run_id"])}
        jobs.append((r["output_uri"], {**common, "sha256": r["out_sha256"], "parent_sha256": r["src_sha256"]}))
        if r.get("access_uri"):  # made by the run that made the derivative, or added later (derive.py)
            maker = r.get("derived_by") or r["run_id"]
            jobs.append((r["access_uri"], {**common, "run_id": maker, "serial": serials.get(maker),
                                           "sha256": r.get("access_sha256"), "parent_sha256": r["out_sha256"]}))
    with ThreadPoolExecutor(8) as pool:
        verdicts = list(pool.map(lambda j: verify_file(j[0], cfg, anchors, j[1]), jobs))
    invalid = [v for v in verdicts if not v["ok"]]
    summary = {"verified_at": dt.datetime.now(dt.timezone.utc).isoformat(), "images": rows.num_rows,
               "files": len(verdicts), "valid": len(verdicts) - len(invalid), "invalid": len(invalid),
               "trust_anchors": bool(anchors), "invalid_files": invalid[:1000]}
    storage.write_bytes(storage.join(output_root, "_verify", "latest.json"),
                        json.dumps(summary, indent=1).encode(), cfg)
    return summary


def last_verification(output_root: str, cfg: StorageConfig) -> dict | None:
    try:
        return json.loads(storage.read_bytes(storage.join(output_root, "_verify", "latest.json"), cfg))
    except FileNotFoundError:
        return None
