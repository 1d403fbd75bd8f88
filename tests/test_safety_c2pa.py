"""C2PA manifests (aigc.safety.c2pa): the local test certificate, sign -> valid, tamper -> invalid,
`aigc verify`, `aigc generate image --c2pa`, the server setting, and the message when c2pa-python
is missing."""

from __future__ import annotations

import base64
import io
import sys
import wave

import pytest

from aigc.safety import c2pa as C
from aigc.safety.provenance import make_record, save_png, verify

needs_c2pa = pytest.mark.skipif(
    not C.available(), reason="c2pa-python is not installed (pip install aigc[c2pa])"
)


def _png_bytes(side: int = 32) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (side, side), (20, 120, 200)).save(buf, format="PNG")
    return buf.getvalue()


def _wav_bytes() -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(bytes(range(256)) * 8)
    return buf.getvalue()


def _edit_text_chunk(png: bytes, old: bytes, new: bytes) -> bytes:
    """Replace `old` by `new` inside the PNG's tEXt chunks, with valid lengths and CRCs."""
    import struct
    import zlib

    out, i = bytearray(png[:8]), 8
    while i < len(png):
        (n,) = struct.unpack(">I", png[i : i + 4])
        kind, data = png[i + 4 : i + 8], png[i + 8 : i + 8 + n]
        if kind == b"tEXt":
            data = data.replace(old, new)
        out += struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        i += 12 + n
    return bytes(out)


@needs_c2pa
def test_certificate_chain_has_the_c2pa_profile():
    from cryptography import x509

    d = C.init_cert()
    assert {p.name for p in d.iterdir()} == {"ca.pem", "signer.pem", "signer.key"}
    assert (d / "signer.key").stat().st_mode & 0o777 == 0o600
    leaf, ca = x509.load_pem_x509_certificates((d / "signer.pem").read_bytes())
    assert leaf.issuer == ca.subject != leaf.subject  # not self-signed: C2PA refuses those
    assert leaf.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ekus = {o.dotted_string for o in leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value}
    assert C.EMAIL_PROTECTION in ekus and C.DOCUMENT_SIGNING in ekus
    before = (d / "signer.pem").read_bytes()
    assert C.init_cert() == d and (d / "signer.pem").read_bytes() == before  # kept
    C.init_cert(force=True)
    assert (d / "signer.pem").read_bytes() != before


@needs_c2pa
def test_sign_png_and_wav_then_tamper(tmp_path):
    import c2pa

    record = make_record("image", "pix@2", {"steps": 4, "sampler": "ddim"}, seed=11, prompt="a cat")
    signed = C.sign_bytes(_png_bytes(), "image/png", record, "cat.png")
    (tmp_path / "cat.png").write_bytes(signed)
    rep = C.read(tmp_path / "cat.png")
    assert rep["status"] == "valid" and rep["trusted"] and rep["failures"] == []
    assert rep["digital_source_type"] == C.SOURCE_TYPE and rep["signer"] == "AIGC Studio local signer"
    assert (
        rep["aigc"]["model"] == "pix@2"
        and rep["aigc"]["seed"] == 11
        and rep["aigc"]["parameters"]["steps"] == 4
    )
    # the oracle: c2pa's own reader, with default settings (our CA unknown there: valid, not trusted)
    with c2pa.Reader("image/png", io.BytesIO(signed)) as r:
        assert r.get_validation_state() == "Valid"
        labels = [a["label"] for a in r.get_active_manifest()["assertions"]]
        assert C.ASSERTION in labels and any(label.startswith("c2pa.actions") for label in labels)

    # a file modified after signing: one pixel byte, or a text chunk added (as an editor would)
    tampered = bytearray(signed)
    idat = signed.index(b"IDAT")
    tampered[idat + 8] ^= 0x01
    (tmp_path / "edit.png").write_bytes(bytes(tampered))
    rep = C.read(tmp_path / "edit.png")
    assert rep["status"] == "invalid" and "assertion.dataHash.mismatch" in rep["failures"]
    from aigc.safety.provenance import stamp_png

    stamp_png(
        tmp_path / "cat.png", record, out=tmp_path / "restamped.png"
    )  # re-encoded by PIL: manifest gone
    assert C.read(tmp_path / "restamped.png")["status"] == "none"

    wav = C.sign_bytes(_wav_bytes(), "audio/wav", make_record("music", "bach@1", {}, seed=1), "p.wav")
    (tmp_path / "p.wav").write_bytes(wav)
    assert C.read(tmp_path / "p.wav")["status"] == "valid"
    with wave.open(io.BytesIO(wav)) as w:  # still a playable WAV with the same samples
        assert w.getnframes() == 1024
    (tmp_path / "p2.wav").write_bytes(wav[:-10] + b"\x00" * 10)
    assert C.read(tmp_path / "p2.wav")["status"] == "invalid"
    assert C.read(tmp_path / "edit.png")["signer"] == "AIGC Studio local signer"


@needs_c2pa
def test_unsigned_and_unsupported_files(tmp_path):
    (tmp_path / "plain.png").write_bytes(_png_bytes())
    assert C.read(tmp_path / "plain.png") == {"status": "none"}
    (tmp_path / "notes.txt").write_text("hello", encoding="utf-8")
    assert C.read(tmp_path / "notes.txt")["status"] == "none"
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 8)
    assert C.read(tmp_path / "broken.png")["status"] == "invalid"
    from aigc.errors import AigcError

    with pytest.raises(AigcError, match="not supported"):
        C.sign_file(tmp_path / "notes.txt", {})


@needs_c2pa
def test_verify_cli_reports_valid_then_invalid(run_cli, tmp_path):
    from PIL import Image

    record = make_record("image", "pix@2", {"steps": 4}, seed=5)
    save_png(Image.new("RGB", (32, 32), (1, 2, 3)), tmp_path / "a.png", record)
    C.sign_file(tmp_path / "a.png", record)
    rep = verify(tmp_path / "a.png")
    assert rep["c2pa"] == "valid" and rep["c2pa_manifest"]["trusted"] and rep["metadata"]["seed"] == 5
    code, out, _ = run_cli("verify", tmp_path / "a.png")
    assert (
        code == 0
        and "c2pa: valid, signed by AIGC Studio local signer" in out
        and "trainedAlgorithmicMedia" in out
    )
    # an edit that keeps the PNG well-formed: the seed in a text chunk changed, its CRC fixed up
    (tmp_path / "a.png").write_bytes(
        _edit_text_chunk((tmp_path / "a.png").read_bytes(), b"Seed: 5", b"Seed: 6")
    )
    assert verify(tmp_path / "a.png")["metadata"]["seed"] == 5  # the JSON chunk was left alone
    code, out, _ = run_cli("verify", tmp_path / "a.png")
    assert code == 0 and "c2pa: invalid" in out and "dataHash.mismatch" in out
    code, out, _ = run_cli("c2pa", "init-cert")
    assert code == 0 and "kept the existing" in out


@needs_c2pa
@pytest.mark.slow
def test_generate_image_and_music_with_c2pa(run_cli, tmp_path):
    from serve_helpers import write_image_run
    from test_serve_music import write_music_run

    run = write_image_run(tmp_path / "pix")
    code, _, err = run_cli("generate", "image", "--model", run, "--out", tmp_path / "imgs", "--n", "2",
                           "--steps", "2", "--c2pa", "--scale", "4", "--watermark")  # fmt: skip
    assert code == 0, err
    for name in ("0.png", "1.png", "grid.png"):
        found = sorted(p.name for p in (tmp_path / "imgs").iterdir())
        path = tmp_path / "imgs" / (name if name in found else found[0])
        rep = verify(path)
        assert rep["c2pa"] == "valid" and rep["c2pa_manifest"]["aigc"]["kind"] == "image"
        assert rep["metadata"]["seed"] == rep["c2pa_manifest"]["aigc"]["seed"]  # the PNG chunks survived
        assert rep["watermark"]["detected"]  # signing after the mark keeps it
    run = write_music_run(tmp_path / "bach")
    code, _, err = run_cli(
        "generate",
        "music",
        "--model",
        run,
        "--out",
        tmp_path / "song",
        "--bars",
        "1",
        "--seed",
        "3",
        "--c2pa",
    )  # (seed 3: this random model's piece has notes; an empty one is refused)
    assert code == 0, err
    assert verify(tmp_path / "song" / "piece-0.wav")["c2pa"] == "valid"
    assert verify(tmp_path / "song" / "piece-0.png")["c2pa_manifest"]["aigc"]["kind"] == "music"
    # the sidecar's hashes are the signed files' (taken after signing)
    assert all(verify(tmp_path / "song" / f"piece-0.{e}")["file_unchanged"] for e in ("wav", "mid"))


@needs_c2pa
def test_server_signs_images_when_asked(tmp_path):
    from fastapi.testclient import TestClient

    from aigc.serve.app import create_app
    from aigc.serve.settings import Settings
    from serve_helpers import write_image_run

    write_image_run(tmp_path / "models" / "pix")
    settings = Settings(models_dirs=[tmp_path / "models"], db=str(tmp_path / "db.sqlite"), c2pa=True,
                        outputs_dir=tmp_path / "outputs")  # fmt: skip
    with TestClient(create_app(settings)) as client:
        r = client.post("/v1/images/generations", json={"model": "pix", "n": 1, "seed": 3})
        assert r.status_code == 200, r.text
        png = base64.b64decode(r.json()["data"][0]["b64_json"])
        row = client.get(f"/v1/generations/{r.json()['generation_ids'][0]}").json()
        assert client.get(f"/v1/outputs/{row['output_ref']}").content == png  # the stored blob is signed
        rep = client.post("/v1/verify", files={"file": ("x.png", png, "image/png")}).json()
    assert rep["c2pa"] == "valid" and rep["c2pa_manifest"]["aigc"]["model"] == "pix"
    assert rep["c2pa_manifest"]["aigc"]["seed"] == 3


def test_without_c2pa_python(run_cli, tmp_path, monkeypatch):
    """c2pa-python absent: verify says how to get it, --c2pa fails before any work with the hint."""
    from PIL import Image

    monkeypatch.setitem(sys.modules, "c2pa", None)  # `import c2pa` now raises ImportError
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    assert verify(tmp_path / "x.png")["c2pa"] == "not checked"
    code, out, _ = run_cli("verify", tmp_path / "x.png")
    assert code == 0 and "c2pa: not checked (install aigc[c2pa]" in out
    code, _, err = run_cli(
        "generate", "image", "--model", tmp_path / "none", "--out", tmp_path / "o", "--c2pa"
    )
    assert code == 1 and "install aigc[c2pa]" in err and not (tmp_path / "o").exists()
    from aigc.errors import AigcError
    from aigc.serve.app import create_app
    from aigc.serve.settings import Settings

    with pytest.raises(AigcError, match=r"install aigc\[c2pa\]"):
        create_app(Settings(models_dirs=[tmp_path], db=str(tmp_path / "db.sqlite"), c2pa=True))


@needs_c2pa
@pytest.mark.slow
def test_server_signs_music_when_asked(tmp_path):
    from fastapi.testclient import TestClient

    from aigc.serve.app import create_app
    from aigc.serve.settings import Settings
    from test_serve_music import write_music_run

    write_music_run(tmp_path / "models" / "bach")
    settings = Settings(models_dirs=[tmp_path / "models"], db=str(tmp_path / "db.sqlite"), c2pa=True)
    with TestClient(create_app(settings)) as client:
        r = client.post("/v1/audio/music", json={"model": "bach", "bars": 1, "seed": 2})
        assert r.status_code == 200, r.text
        wav = base64.b64decode(r.json()["data"][0]["wav_b64"])
        roll = base64.b64decode(r.json()["data"][0]["piano_roll_b64"])
        music = client.post("/v1/verify", files={"file": ("p.wav", wav, "audio/wav")}).json()
    assert music["c2pa"] == "valid" and music["c2pa_manifest"]["aigc"]["seed"] == 2
    assert music["c2pa_manifest"]["aigc"]["kind"] == "music"
    (tmp_path / "roll.png").write_bytes(roll)
    assert C.read(tmp_path / "roll.png")["status"] == "valid"
