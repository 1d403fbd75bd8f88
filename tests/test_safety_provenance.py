"""Provenance records (PNG chunks, sidecars), the image watermark, and `aigc verify` / `aigc detect image`."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter

from aigc.errors import AigcError
from aigc.safety import provenance as prov
from aigc.safety import watermark_image as WI
from aigc.safety.watermark_text import WatermarkConfig

KEY = WatermarkConfig(key="ab" * 32)


def natural(n: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Smooth random texture with some detail at several scales (a stand-in for a photo)."""
    rng = np.random.default_rng(seed)
    ch = 3 if mode == "RGB" else 1
    base = sum(gaussian_filter(rng.normal(size=(n, n, ch)), (s, s, 0)) * (s * 12) for s in (1, 3, 8))
    return Image.fromarray(np.clip(128 + base, 0, 255).astype(np.uint8).squeeze(), mode)


def jpeg(im: Image.Image, quality: int = 75) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert(im.mode)


# ---------------------------------------------------------------------------- image watermark


@pytest.mark.parametrize(("size", "mode"), [(64, "RGB"), (128, "L"), (256, "RGB")])
def test_image_mark_survives_jpeg75_and_is_invisible(size, mode):
    im = natural(size, mode)
    marked = WI.embed(im, KEY)
    assert marked.size == im.size and marked.mode == im.mode
    assert WI.psnr(im, marked) >= 38
    if mode == "RGB":  # the luma change is applied to all channels: colour (R - G) barely moves
        a, b = np.asarray(im, float), np.asarray(marked, float)
        assert np.abs((a[..., 0] - a[..., 1]) - (b[..., 0] - b[..., 1])).max() <= 2
    d = WI.detect(jpeg(marked), KEY)
    assert d.bit_accuracy >= 0.95 and d.detected and d.p_value < 1e-5
    # unmarked image and another key: no detection
    assert not WI.detect(jpeg(im), KEY).detected
    assert not WI.detect(marked, WatermarkConfig(key="cd" * 32)).detected


def test_image_mark_payload_is_the_key_id_and_small_images():
    bits, _ = WI.read_bits(WI.embed(natural(64), KEY), KEY)
    assert np.packbits(bits).tobytes().hex() == KEY.key_id[:8]
    with pytest.raises(AigcError, match="at least 24x24"):
        WI.embed(natural(16), KEY)
    # 28x28 lossless works (9 blocks, each bit about once); JPEG at that size is not promised
    small = natural(28, "L")
    assert WI.detect(WI.embed(small, KEY), KEY).detected
    assert WI.binomial_tail(32, 32) == 2**-32 and WI.binomial_tail(0, 32) == 1.0


# ---------------------------------------------------------------------------- provenance records


def record(**kw):
    base = dict(
        kind="image",
        model="mnist-ddpm@2",
        parameters={"steps": 50, "sampler": "ddim", "guidance": 2.5, "width": 28, "height": 28, "label": "7"},
        seed=1234,
        prompt="a hand-written 7, clean",
        model_hash="0123456789",
        watermark_key_id=KEY.key_id,
        created=0.0,
    )
    return prov.make_record(**{**base, **kw})


def test_png_chunks_a1111_line_and_roundtrip(tmp_path):
    r = record()
    assert r["created"] == "1970-01-01T00:00:00Z" and r["watermark"] == {"key_id": KEY.key_id}
    line = prov.a1111_parameters(r)
    assert line.split("\n")[0] == "a hand-written 7, clean"
    assert "Steps: 50, Sampler: ddim, CFG scale: 2.5, Seed: 1234, Size: 28x28, Model hash: 0123456789" in line
    parsed = prov.parse_a1111(line)
    assert parsed["prompt"] == "a hand-written 7, clean" and parsed["Seed"] == "1234"
    assert parsed["Model"] == "mnist-ddpm@2" and parsed["Watermark"] == KEY.key_id
    # a value with a comma is quoted, as A1111 does, and parses back
    tricky = prov.a1111_parameters(record(model="a, b: c"))
    assert prov.parse_a1111(tricky)["Model"] == "a, b: c"

    path = prov.save_png(natural(32), tmp_path / "x.png", r, extra={"note": "héllo"})
    got, chunks = prov.read_png_record(path)
    assert got == r and chunks["parameters"] == line and chunks["note"] == "héllo"
    with pytest.raises(AigcError, match="unknown"):
        prov.make_record(kind="video", model="m")


def test_stamp_png_keeps_image_io_params(tmp_path):
    from aigc.generation.image_io import save_png

    img = natural(32)
    path = save_png(img, tmp_path / "s.png", {"model": "m@1", "seed": 5, "steps": 10})
    prov.stamp_png(path, prov.make_record(kind="image", model="m@1", seed=5))
    got, chunks = prov.read_png_record(path)
    assert got["parameters"] == {"model": "m@1", "seed": 5, "steps": 10}  # image_io's JSON kept
    assert chunks["parameters"].endswith("Seed: 5, Model: m@1")
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(img))


def test_corrupted_truncated_and_foreign_files(tmp_path):
    path = prov.save_png(natural(64), tmp_path / "x.png", record())
    data = path.read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(AigcError, match="corrupted or truncated"):
        prov.verify(tmp_path / "trunc.png")
    bad = bytearray(data)
    bad[len(bad) // 2] ^= 0xFF  # flips a byte inside the image data: CRC / zlib error
    (tmp_path / "flip.png").write_bytes(bytes(bad))
    with pytest.raises(AigcError, match="corrupted or truncated"):
        prov.verify(tmp_path / "flip.png")
    (tmp_path / "fake.png").write_bytes(b"GIF89a not a png")
    r = prov.verify(tmp_path / "fake.png")  # not a PNG: treated as an unknown file without metadata
    assert r["metadata"] is None and r["metadata_source"] == "none"
    with pytest.raises(AigcError, match="not found"):
        prov.verify(tmp_path / "nope.png")


def test_sidecars_and_verify(tmp_path, monkeypatch):
    monkeypatch.setenv("AIGC_WATERMARK_KEY", KEY.key)
    wav = tmp_path / "song.wav"
    wav.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt ")
    r = prov.make_record(kind="music", model="folk@1", seed=3)
    prov.write_sidecar(wav, r)
    rep = prov.verify(wav)
    assert rep["metadata"]["model"] == "folk@1" and rep["file_unchanged"] is True
    assert rep["watermark"]["status"] == "not applicable" and rep["c2pa"] == "none"
    wav.write_bytes(b"RIFF edited")
    assert prov.verify(wav)["file_unchanged"] is False
    mid = tmp_path / "piece-0.mid"  # music outputs: save_music writes piece-0.json beside
    mid.write_bytes(b"MThd")
    (tmp_path / "piece-0.json").write_text('{"key": "D minor", "seed": 7}', encoding="utf-8")
    rep = prov.verify(mid)
    assert rep["metadata"]["seed"] == 7 and rep["metadata_source"] == "sidecar piece-0.json"

    txt = prov.save_text(
        "Hello there.", tmp_path / "t.txt", prov.make_record(kind="text", model="tiny@1", seed=1)
    )
    rep = prov.verify(txt)
    assert rep["metadata"]["kind"] == "text" and "--model" in rep["watermark"]["status"]

    # an image marked and stamped: verify finds both
    img = WI.embed(natural(128), KEY)
    png = prov.save_png(img, tmp_path / "m.png", record())
    rep = prov.verify(png)
    assert rep["metadata"]["seed"] == 1234 and rep["watermark"]["detected"]
    plain = prov.save_png(natural(128, seed=1), tmp_path / "p.png", record())
    assert not prov.verify(plain)["watermark"]["detected"]


def test_cli_verify_and_detect_image(run_cli, tmp_path, monkeypatch):
    monkeypatch.setenv("AIGC_WATERMARK_KEY", KEY.key)
    png = prov.save_png(WI.embed(natural(96), KEY), tmp_path / "m.png", record())
    code, out, err = run_cli("verify", png)
    assert code == 0, err
    assert (
        "model: mnist-ddpm@2" in out and "seed: 1234" in out and "watermarked" in out and "c2pa: none" in out
    )
    code, out, _ = run_cli("verify", png, "--json")
    assert code == 0 and json.loads(out)["metadata"]["model_hash"] == "0123456789"
    jpg = tmp_path / "m.jpg"
    Image.open(png).save(jpg, quality=75)
    code, out, _ = run_cli("detect", "image", jpg)
    assert code == 0 and out.startswith("watermarked")
    code, out, _ = run_cli("detect", "image", prov.save_png(natural(96), tmp_path / "u.png", record()))
    assert code == 0 and out.startswith("no watermark")
    (tmp_path / "broken.png").write_bytes(png.read_bytes()[:200])
    code, _, err = run_cli("verify", tmp_path / "broken.png")
    assert code == 1 and "truncated" in err and "Traceback" not in err
    code, _, err = run_cli("detect", "image", tmp_path / "broken.png")
    assert code == 1 and "not a readable image" in err
    code, out, _ = run_cli("detect", "--help")
    assert code == 0 and "text" in out and "image" in out


def test_verify_reads_image_io_and_a1111_pngs(tmp_path):
    from PIL.PngImagePlugin import PngInfo

    from aigc.generation.image_io import save_png

    path = save_png(natural(32), tmp_path / "server.png", {"model": "pix", "seed": 3})
    rep = prov.verify(path)
    assert rep["metadata"] == {"parameters": {"model": "pix", "seed": 3}} and "JSON" in rep["metadata_source"]
    info = PngInfo()
    info.add_text("parameters", "a castle\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 42, Model: sd15")
    natural(32).save(tmp_path / "a1111.png", pnginfo=info)
    rep = prov.verify(tmp_path / "a1111.png")
    assert rep["a1111"]["Seed"] == "42" and rep["a1111"]["prompt"] == "a castle" and rep["metadata"] is None
    natural(32).save(tmp_path / "bare.png")
    assert prov.verify(tmp_path / "bare.png")["metadata_source"] == "none"


def test_stamp_image_files_marks_and_records(tmp_path, monkeypatch):
    from aigc.generation.image_io import save_png

    monkeypatch.setenv("AIGC_WATERMARK_KEY", KEY.key)
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors").write_bytes(b"weights")
    paths = [save_png(natural(64, seed=i), tmp_path / f"image-{i}.png", {"model": "run", "seed": i, "label": 3})
             for i in range(2)]  # fmt: skip
    prov.stamp_image_files(paths, run, watermark=True)
    for i, p in enumerate(paths):
        rec, chunks = prov.read_png_record(p)
        assert (
            rec["seed"] == i and rec["parameters"]["label"] == 3 and rec["watermark"]["key_id"] == KEY.key_id
        )
        assert rec["model_hash"] == prov.model_hash(run) and chunks["label"] == "3"  # image_io's chunks kept
        assert WI.detect(Image.open(p), KEY).detected
    with pytest.raises(AigcError, match="at least 24x24"):
        prov.stamp_image_files([save_png(natural(16), tmp_path / "tiny.png", {})], watermark=True)


def test_cli_generate_image_stamps_and_marks(run_cli, tmp_path, monkeypatch):
    from aigc.generation.image_io import read_png_params
    from serve_helpers import write_image_run

    monkeypatch.setenv("AIGC_WATERMARK_KEY", KEY.key)
    run = write_image_run(tmp_path / "pix")
    base = ["generate", "image", "--model", run, "--n", "2", "--steps", "2", "--seed", "4", "--scale", "4"]
    code, _, err = run_cli(*base, "--out", tmp_path / "plain")
    assert code == 0, err
    rec, chunks = prov.read_png_record(tmp_path / "plain" / "image-001.png")
    assert (
        rec["seed"] == read_png_params(tmp_path / "plain" / "image-001.png")["seed"]
    )  # image_io still reads it
    assert (
        rec["model_hash"] == prov.model_hash(run)
        and rec["watermark"] is None
        and "Seed: " in chunks["parameters"]
    )
    code, _, err = run_cli(*base, "--out", tmp_path / "marked", "--watermark")
    assert code == 0, err
    code, out, _ = run_cli("verify", tmp_path / "marked" / "image-000.png")
    assert "watermarked" in out and KEY.key_id in out
    code, out, _ = run_cli("detect", "image", tmp_path / "plain" / "image-000.png")
    assert out.startswith("no watermark")
    # 8x8 images cannot carry the mark: a clean error, nothing written
    code, _, err = run_cli(*base[:-2], "--out", tmp_path / "small", "--watermark")
    assert code == 1 and "at least 24x24" in err and not (tmp_path / "small").exists()
