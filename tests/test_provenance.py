"""C2PA Content Credentials: material checked at preflight, manifests on restored derivatives and access
copies, verification, and no key material anywhere. A throwaway CA and signer are made in the test."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pipeline import imageio, metadata, provenance
from pipeline.config import StorageConfig, load_config
from pipeline.stages import Compose, DecodeDetect, Restore

from conftest import IMAGES, need, test_overrides

NOW = dt.datetime.now(dt.timezone.utc)


def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Test Museum")])


def make_pki(d: Path, *, expired: bool = False, eku: bool = True, other_key: bool = False) -> dict[str, Path]:
    """A root CA and an ES256 signer made here (no key is ever committed); files in ``d``."""
    d.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("Test Root CA")).issuer_name(_name("Test Root CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(NOW - dt.timedelta(days=400)).not_valid_after(NOW + dt.timedelta(days=3650))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder().subject_name(_name("Test Signer")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW - dt.timedelta(days=300))
            .not_valid_after(NOW - dt.timedelta(days=1) if expired else NOW + dt.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
    if eku:
        leaf = leaf.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
    leaf = leaf.sign(ca_key, hashes.SHA256())
    pem = serialization.Encoding.PEM
    signing_key = ec.generate_private_key(ec.SECP256R1()) if other_key else key
    files = {"chain": d / "chain.pem", "key": d / "key.pem", "ca": d / "ca.pem"}
    files["chain"].write_bytes(leaf.public_bytes(pem) + ca.public_bytes(pem))
    files["ca"].write_bytes(ca.public_bytes(pem))
    files["key"].write_bytes(signing_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    return files


def key_fragments(key_file: Path) -> list[str]:
    """Pieces of the key's PEM body that must never appear anywhere (each base64 line of it)."""
    return [line for line in key_file.read_text().splitlines() if line and not line.startswith("-----")]


def _material(pki, **cfg):
    c = load_config(None, {"provenance.c2pa": "sign", "provenance.cert_chain": str(pki["chain"]),
                           "provenance.private_key": str(pki["key"]), **cfg}, environ={})
    return provenance.load(c.provenance, c.storage)


@pytest.mark.parametrize("kind,words", [
    ("expired", "expired on"), ("other_key", "is not the key of certificate"), ("no_eku", "extended key usage"),
])
def test_unusable_material_fails_preflight_saying_why(tmp_path, kind, words):
    pki = make_pki(tmp_path, expired=kind == "expired", other_key=kind == "other_key", eku=kind != "no_eku")
    with pytest.raises(provenance.ProvenanceError, match=words) as e:
        _material(pki)
    assert not any(f in str(e.value) for f in key_fragments(pki["key"]))


def test_material_from_env_and_alg_mismatch(tmp_path, monkeypatch):
    pki = make_pki(tmp_path)
    monkeypatch.setenv("TEST_C2PA_KEY", pki["key"].read_text())
    m = _material(pki, **{"provenance.private_key": "env:TEST_C2PA_KEY"})
    assert m.key == pki["key"].read_bytes()
    assert not any(f in repr(m) for f in key_fragments(pki["key"])) and "BEGIN" not in repr(m)
    assert "BEGIN" not in json.dumps(m.describe())
    with pytest.raises(provenance.ProvenanceError, match="does not fit the key"):
        _material(pki, **{"provenance.alg": "ps256"})
    with pytest.raises(provenance.ProvenanceError, match="TEST_NOT_SET"):
        _material(pki, **{"provenance.private_key": "env:TEST_NOT_SET"})


def _signing_config(weights_dir, out, pki, **extra):
    """The test job's settings with signing on, with this PKI."""
    return load_config(None, test_overrides(weights_dir, out, **{
        "provenance.c2pa": "sign", "provenance.cert_chain": str(pki["chain"]),
        "provenance.private_key": str(pki["key"]), **extra}), environ={})


def _restored(cfg, files: dict[str, Path]):
    """DecodeDetect and Restore over ``files`` (image id -> path), as the job hands them to Compose."""
    src = next(iter(files.values())).parent
    batch = {"image_id": np.array(list(files), object), "uri": np.array([str(f) for f in files.values()], object)}
    return Restore(cfg)(DecodeDetect(cfg, root=str(src) + "/")(batch))


@pytest.fixture(scope="module")
def signed(weights_dir, tmp_path_factory):
    """A Compose of real photos (one with faces and rich metadata, one without faces), signing on."""
    d = tmp_path_factory.mktemp("prov")
    pki = make_pki(d / "pki")
    src = d / "in"
    src.mkdir()
    master = _with_metadata(need(IMAGES / "whole/codeformer_04.jpg").read_bytes())
    (src / "face.jpg").write_bytes(master)
    shutil.copy(need(IMAGES / "old/old_d.png"), src / "noface.png")
    out = d / "out"
    cfg = _signing_config(weights_dir, out, pki, **{"output.access_copy": True})
    m = provenance.load(cfg.provenance, cfg.storage)
    restored = _restored(cfg, {"face": src / "face.jpg", "noface": src / "noface.png"})
    rows = Compose(cfg, "run-1", "fp-1", True, software="archive-restore test; GFPGAN sha256:0123",
                   provenance=m)(restored).to_pylist()
    return rows, pki, master, out, m, restored, cfg


def _with_metadata(jpeg: bytes) -> bytes:
    with metadata.pyexiv2.ImageData(jpeg) as img:
        img.modify_exif({"Exif.Image.Artist": "Studio Müller, 1931"})
        img.modify_iptc({"Iptc.Application2.ObjectName": "Family portrait"})
        img.modify_xmp({"Xmp.dc.title": "Portrait, box 12"})
        return img.get_bytes()


def test_a_restored_derivative_carries_valid_credentials(signed):
    rows, pki, master = signed[:3]
    r = rows[0]
    assert r["status"] == "ok" and r["c2pa_signed"] is True
    data = Path(r["output_uri"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == r["out_sha256"]
    v = provenance.verify(data, "JPEG")
    assert v.state == "Valid" and v.failures == ["signingCredential.untrusted"] and v.ok
    assert v.parent_sha256 == r["src_sha256"] == hashlib.sha256(master).hexdigest()
    assert v.actions == ["c2pa.opened", "c2pa.edited"]
    assert v.facts["run_id"] == "run-1" and v.facts["fingerprint"] == "fp-1"
    boxes = [[f["box"][k] for k in ("x1", "y1", "x2", "y2")] for f in v.facts["faces"]]
    assert boxes == [pytest.approx(f["bbox"]) for f in r["faces"]]
    assert v.facts["faces"][0]["action"] == "restored"
    trusted = provenance.verify(data, "JPEG", pki["ca"].read_bytes())
    assert trusted.state == "Trusted" and trusted.failures == []
    # the metadata carried before signing survives it, and so does the IPTC label
    md = metadata.read(data)
    assert md["exif"]["Exif.Image.Artist"] == "Studio Müller, 1931"
    assert md["iptc"]["Iptc.Application2.ObjectName"] == "Family portrait"
    assert md["xmp"]["Xmp.dc.title"]["lang=\"x-default\""] == "Portrait, box 12"
    assert md["xmp"]["Xmp.iptcExt.DigitalSourceType"] == metadata.AI_SOURCE_TYPE
    assert imageio.decode(data, 10**9).width == r["width"]


def test_the_access_copy_has_the_derivative_as_parent(signed):
    r = signed[0][0]
    v = provenance.verify(Path(r["access_uri"]).read_bytes(), "JPEG")
    assert v.ok and v.parent_sha256 == r["out_sha256"]


def test_no_restored_face_no_credentials(signed):
    r = signed[0][1]
    assert r["status"] == "no_face" and not r["c2pa_signed"] and r["output_uri"] is None


def test_a_changed_derivative_fails_verification(signed):
    r = signed[0][0]
    data = Path(r["output_uri"]).read_bytes()
    px = imageio.decode(data, 10**9).pixels
    px[0:8, 0:8] = 255 - px[0:8, 0:8]
    import cv2
    tampered = provenance.verify(_replace_scan(data, cv2.imencode(".jpg", px)[1].tobytes()), "JPEG")
    assert not tampered.ok and "assertion.dataHash.mismatch" in tampered.failures
    flipped = bytearray(data)
    flipped[-100] ^= 0xFF  # one byte of the compressed pixels
    assert not provenance.verify(bytes(flipped), "JPEG").ok


def _replace_scan(signed_jpeg: bytes, other_jpeg: bytes) -> bytes:
    """The signed file's headers (manifest included) with another picture's compressed scan: new pixels."""
    return signed_jpeg[:_sos(signed_jpeg)] + other_jpeg[_sos(other_jpeg):]


def _sos(jpeg: bytes) -> int:
    """Where the scan starts, found by walking the segments: a search for FF DA also hits the bytes of the
    signature or certificates in the C2PA segment now and then (the suite failed on that once)."""
    i = 2
    while jpeg[i] == 0xFF and jpeg[i + 1] != 0xDA:
        i += 2 + int.from_bytes(jpeg[i + 2:i + 4], "big")
    assert jpeg[i:i + 2] == b"\xff\xda", "no start of scan"
    return i


@pytest.mark.parametrize("fmt", ["png", "tiff", "webp"])
def test_other_formats_carry_credentials(weights_dir, tmp_path, fmt):
    pki = make_pki(tmp_path / "pki")
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(need(IMAGES / "whole/codeformer_04.jpg"), src / "a.jpg")
    cfg = _signing_config(weights_dir, tmp_path / "out", pki, **{"output.format": fmt})
    restored = _restored(cfg, {"a": src / "a.jpg"})
    r = Compose(cfg, "r", "f", True, provenance=provenance.load(cfg.provenance, cfg.storage))(restored).to_pylist()[0]
    data = Path(r["output_uri"]).read_bytes()
    assert r["c2pa_signed"] and provenance.verify(data, fmt.upper()).ok
    assert imageio.decode(data, 10**9).width == r["width"]


def test_bmp_gets_a_note_and_a_signing_failure_writes_nothing(weights_dir, tmp_path):
    import cv2

    pki = make_pki(tmp_path / "pki")
    src = tmp_path / "in"
    src.mkdir()
    img = cv2.imread(str(need(IMAGES / "whole/codeformer_04.jpg")))
    cv2.imwrite(str(src / "a.bmp"), img)
    shutil.copy(need(IMAGES / "whole/codeformer_04.jpg"), src / "b.jpg")
    cfg = _signing_config(weights_dir, tmp_path / "out", pki)
    m = provenance.load(cfg.provenance, cfg.storage)
    restored = _restored(cfg, {"a": src / "a.bmp", "b": src / "b.jpg"})
    rows = Compose(cfg, "r", "f", True, provenance=m)(restored).to_pylist()
    assert rows[0]["status"] == "ok" and not rows[0]["c2pa_signed"] and "cannot carry them" in rows[0]["notes"]
    broken = provenance.Material(m.chain, m.key.replace(b"PRIVATE KEY", b"PUBLIC KEY"), m.alg)  # fails to sign
    out = tmp_path / "out2"
    cfg2 = cfg.model_copy(update={"output": cfg.output.model_copy(update={"root": str(out)})})
    row = Compose(cfg2, "r", "f", True, provenance=broken)(restored.slice(1, 1)).to_pylist()[0]
    assert row["status"] == "write_error" and row["error"].startswith("C2PA signing failed")
    assert not (out / "images").exists() or not any((out / "images").rglob("*.*"))
    assert not any(f in row["error"] for f in key_fragments(pki["key"]))


@pytest.mark.slow
def test_a_signed_job_verifies_and_never_shows_its_key(ray_local, weights_dir, tmp_path, caplog):
    import logging

    from click.testing import CliRunner

    from pipeline import job
    from pipeline.cli import cli
    from pipeline.ledger import load_results

    from conftest import E2E_IMAGES

    pki = make_pki(tmp_path / "pki")
    src = tmp_path / "archive"
    for rel in E2E_IMAGES[:5]:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(need(IMAGES / rel), src / rel)
    import pyarrow.csv as pacsv
    pacsv.write_csv(pa.table({"uri": [str(src / r) for r in E2E_IMAGES[:5]]}), tmp_path / "m.csv")
    out = tmp_path / "out"
    settings = {"output.access_copy": True, "provenance.c2pa": "sign", "provenance.cert_chain": str(pki["chain"]),
                "provenance.private_key": str(pki["key"])}
    cfg = load_config(None, test_overrides(weights_dir, out, tmp_path / "m.csv", **settings), environ={})
    with caplog.at_level(logging.DEBUG):
        record = job.run(cfg)
    rows = load_results(str(out), StorageConfig()).to_pylist()
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok and all(r["c2pa_signed"] for r in ok) and not any(r["c2pa_signed"] for r in rows if r not in ok)
    assert "CN=Test Signer" in record["signing"]["subject"] and "key" not in json.dumps(record["signing"])
    r = CliRunner().invoke(cli, ["verify", str(out), "--trust-anchors", str(pki["ca"])])
    assert r.exit_code == 0, r.output
    assert f"{2 * len(ok)} files checked: {2 * len(ok)} valid, 0 invalid" in r.output
    st = CliRunner().invoke(cli, ["status", str(out)])
    assert f"signed        {len(ok)} derivatives" in st.output and "0 invalid" in st.output
    # a derivative changed after signing is caught, and named
    victim = Path(ok[0]["output_uri"])
    data = bytearray(victim.read_bytes())
    data[-100] ^= 0xFF
    victim.write_bytes(bytes(data))
    r = CliRunner().invoke(cli, ["verify", str(out)])
    assert r.exit_code == 1 and f"INVALID {victim}" in r.output and "dataHash.mismatch" in r.output
    # no key material in the output tree, the run record, the results, the logs of the driver and of Ray
    import ray
    texts = [p.read_bytes().decode("latin-1") for p in out.rglob("*") if p.is_file()]
    session = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    texts += [p.read_bytes().decode("latin-1") for p in session.rglob("*") if p.is_file() and p.stat().st_size < 5e7]
    texts += [caplog.text, r.output, st.output]
    for fragment in key_fragments(pki["key"]):
        assert not any(fragment in t for t in texts), "key material leaked"


@pytest.mark.slow
def test_an_expired_certificate_stops_the_run_before_any_work(weights_dir, tmp_path):
    from pipeline import job
    from pipeline.errors import ConfigError

    pki = make_pki(tmp_path / "pki", expired=True)
    (tmp_path / "in").mkdir()
    shutil.copy(need(IMAGES / "whole/codeformer_04.jpg"), tmp_path / "in" / "a.jpg")
    (tmp_path / "m.csv").write_text(f"uri\n{tmp_path / 'in' / 'a.jpg'}\n")
    out = tmp_path / "out"
    cfg = load_config(None, test_overrides(weights_dir, out, tmp_path / "m.csv", **{
        "provenance.c2pa": "sign", "provenance.cert_chain": str(pki["chain"]),
        "provenance.private_key": str(pki["key"])}), environ={})
    with pytest.raises(ConfigError, match="expired on"):
        job.run(cfg)
    assert not (out / "_results").exists() and not (out / "images").exists()
    rec = json.loads(next((out / "_runs").glob("*.json")).read_text())
    assert rec["state"] == "failed" and "expired" in rec["error"]


@pytest.mark.integration
def test_material_from_s3(tmp_path, s3_endpoint, s3fs_client):
    pki = make_pki(tmp_path)
    s3fs_client.mkdir("keys")
    s3fs_client.put_file(str(pki["chain"]), "keys/chain.pem")
    s3fs_client.put_file(str(pki["key"]), "keys/key.pem")
    m = _material(pki, **{"provenance.cert_chain": "s3://keys/chain.pem", "provenance.private_key": "s3://keys/key.pem",
                          "storage.s3_endpoint_url": s3_endpoint})
    assert m.key == pki["key"].read_bytes()
    with pytest.raises(provenance.ProvenanceError, match="s3://keys/missing.pem not found"):
        _material(pki, **{"provenance.private_key": "s3://keys/missing.pem", "storage.s3_endpoint_url": s3_endpoint})


def test_a_key_inside_the_chain_file_is_refused_and_never_embedded(tmp_path, signed):
    pki = make_pki(tmp_path)
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(pki["chain"].read_bytes() + pki["key"].read_bytes())  # cat fullchain.pem privkey.pem
    with pytest.raises(provenance.ProvenanceError, match="holds more than certificates"):
        _material(pki, **{"provenance.cert_chain": str(bundle)})
    pki0, out = signed[1], signed[3]  # the files of a real signing: the secret scalar is in none of them
    scalar = serialization.load_pem_private_key(pki0["key"].read_bytes(), None).private_numbers().private_value
    for p in (p for p in out.rglob("*") if p.is_file()):
        assert scalar.to_bytes(32, "big") not in p.read_bytes(), p


def test_other_key_formats_are_taken_as_pkcs8(tmp_path):
    pki = make_pki(tmp_path)
    key = serialization.load_pem_private_key(pki["key"].read_bytes(), password=None)
    sec1 = tmp_path / "sec1.pem"  # what `openssl ecparam -genkey` writes
    sec1.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                       serialization.NoEncryption()))
    m = _material(pki, **{"provenance.private_key": str(sec1)})
    assert m.key.startswith(b"-----BEGIN PRIVATE KEY-----")


def _cert(subject, issuer_cert, issuer_key, key, *, ku=True, eku=(ExtendedKeyUsageOID.EMAIL_PROTECTION,)):
    b = (x509.CertificateBuilder().subject_name(_name(subject))
         .issuer_name(issuer_cert.subject if issuer_cert else _name(subject))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(NOW - dt.timedelta(days=1)).not_valid_after(NOW + dt.timedelta(days=30))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True))
    if ku:
        b = b.add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
    if eku:
        b = b.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


@pytest.mark.parametrize("case,words", [
    ("other_ca_with_anchors", "does not verify against provenance.trust_anchors"),
    ("out_of_order", "out of order or incomplete"),
    ("no_key_usage", "no key usage extension"),
    ("any_eku", "anyExtendedKeyUsage"),
    ("rsa_1024", "needs at least 2048"),
])
def test_preflight_names_what_is_wrong_with_a_chain(tmp_path, case, words):
    from cryptography.hazmat.primitives.asymmetric import rsa

    pki = make_pki(tmp_path / "good")
    pem = serialization.Encoding.PEM
    chain_certs = x509.load_pem_x509_certificates(pki["chain"].read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    extra = {}
    if case == "other_ca_with_anchors":  # a good chain, but to a root the institution does not trust
        other = make_pki(tmp_path / "other")
        with pytest.raises(provenance.ProvenanceError, match=words):
            _material(other, **{"provenance.trust_anchors": str(pki["ca"])})
        return
    elif case == "out_of_order":
        other = ec.generate_private_key(ec.SECP256R1())
        certs = [_cert("Signer", chain_certs[1], other, key), chain_certs[1]]  # claims the CA issued it; it did not
    elif case == "no_key_usage":
        certs = [_cert("Signer", None, key, key, ku=False)]
    elif case == "any_eku":
        certs = [_cert("Signer", None, key, key, eku=(ExtendedKeyUsageOID.EMAIL_PROTECTION,
                                                     ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE))]
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
        certs = [_cert("Signer", None, key, key)]
        extra["provenance.alg"] = "ps256"
    (tmp_path / "chain.pem").write_bytes(b"".join(c.public_bytes(pem) for c in certs))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    with pytest.raises(provenance.ProvenanceError, match=words):
        _material({"chain": tmp_path / "chain.pem", "key": tmp_path / "key.pem"}, **extra)


def test_verify_checks_bytes_parent_facts_signer_and_anchors(signed, tmp_path):
    rows, pki, _, out, m, restored, cfg = signed
    r = rows[0]
    expect = {"sha256": r["out_sha256"], "parent_sha256": r["src_sha256"], "run_id": "run-1", "image_id": "face",
              "serial": m.describe()["serial"]}
    assert provenance.verify_file(r["output_uri"], StorageConfig(), None, expect)["ok"]
    assert provenance.verify_file(r["output_uri"], StorageConfig(), pki["ca"].read_bytes(), expect)["ok"]
    other_ca = make_pki(tmp_path / "other")["ca"].read_bytes()
    assert not provenance.verify_file(r["output_uri"], StorageConfig(), other_ca, expect)["ok"]
    wrong = [({**expect, "sha256": "0" * 64}, "bytes are not"), ({**expect, "parent_sha256": "1" * 64}, "parent"),
             ({**expect, "run_id": "run-2"}, "facts"), ({**expect, "serial": "42"}, "serial")]
    for e, words in wrong:
        v = provenance.verify_file(r["output_uri"], StorageConfig(), None, e)
        assert not v["ok"] and words in v["why"], (e, v)
    # the access copy's parent is the derivative, not the master
    v = provenance.verify_file(r["access_uri"], StorageConfig(), None, {**expect, "sha256": r["access_sha256"],
                                                                          "parent_sha256": r["src_sha256"]})
    assert not v["ok"] and "parent" in v["why"]


def test_a_certificate_that_expires_mid_run_stops_the_run(signed):
    rows, pki, _, out, m, restored, cfg = signed
    stage = Compose(cfg, "run-x", "fp", True, provenance=m)
    stage._signer = provenance.Signer(m, "x")
    stage._signer.expires = NOW - dt.timedelta(seconds=1)
    with pytest.raises(provenance.SigningExpired, match="expired"):
        stage(restored.slice(0, 1))


def test_a_bmp_derivative_and_its_access_copy_stay_unsigned_together(weights_dir, tmp_path):
    import cv2

    pki = make_pki(tmp_path / "pki")
    src = tmp_path / "in"
    src.mkdir()
    cv2.imwrite(str(src / "a.bmp"), cv2.imread(str(need(IMAGES / "whole/codeformer_04.jpg"))))
    cfg = _signing_config(weights_dir, tmp_path / "out", pki, **{"output.access_copy": True})
    restored = _restored(cfg, {"a": src / "a.bmp"})
    r = Compose(cfg, "r", "f", True, provenance=provenance.load(cfg.provenance, cfg.storage))(restored).to_pylist()[0]
    assert r["status"] == "ok" and not r["c2pa_signed"]
    assert provenance.verify(Path(r["access_uri"]).read_bytes(), "JPEG").state is None
