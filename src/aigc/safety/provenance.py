"""Provenance: every output says where it came from.

One record per output (`make_record`): kind, model@version, model hash, parameters, seed, prompt,
creation time (UTC, ISO 8601) and the watermark key id when a mark was applied. It travels as:

- PNG: two text chunks. `parameters` is the one-line-per-field text AUTOMATIC1111's web UI writes
  (prompt, then "Steps: 20, Sampler: ..., Seed: 1, Model hash: ..., Model: ..."), so tools that
  read A1111 images (civitai, sd-parsers, the web UI's "PNG info" tab) show it; `aigc` holds the
  full record as JSON (the parameters chunk is lossy by design).
- WAV / MIDI / text / anything else: a JSON sidecar `<file>.aigc.json` beside the file.

`verify(path)` reads a file's record back, checks it (a corrupted or truncated PNG is an
AigcError), and reports watermark detection and C2PA status (`aigc.safety.c2pa`: "none",
"valid", "invalid", or "not checked" when the optional `c2pa-python` is not installed).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from aigc.errors import AigcError
from aigc.utils.io import atomic_write, atomic_write_json

FORMAT_VERSION = 1
SIDECAR_SUFFIX = ".aigc.json"
MAX_VERIFY_BYTES = 256 * 2**20  # larger files are refused rather than read into memory
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
KINDS = ("text", "image", "music", "audio")
# A1111 field names for our parameter keys, in the order the web UI writes them
A1111_FIELDS = (
    ("steps", "Steps"),
    ("sampler", "Sampler"),
    ("guidance", "CFG scale"),
    ("seed", "Seed"),
    ("size", "Size"),
    ("model_hash", "Model hash"),
    ("model", "Model"),
)


def model_hash(path: str | Path) -> str:
    """Short content hash of a model's weights (sha256 of `model.safetensors`, first 10 hex digits,
    the length A1111 shows); a directory means its `model.safetensors`."""
    p = Path(path)
    if p.is_dir():
        p = p / "model.safetensors"
    if not p.is_file():
        raise AigcError(f"cannot hash model weights: {p} not found; pass a run directory")
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:10]


def make_record(
    kind: str,
    model: str,
    parameters: dict[str, Any] | None = None,
    seed: int | None = None,
    prompt: str | None = None,
    model_hash: str | None = None,
    watermark_key_id: str | None = None,
    created: float | None = None,
) -> dict[str, Any]:
    """The provenance record of one output (JSON-ready)."""
    if kind not in KINDS:
        raise AigcError(f"provenance kind {kind!r} is unknown; allowed: {', '.join(KINDS)}")
    created = time.time() if created is None else created
    return {
        "aigc_provenance": FORMAT_VERSION,
        "kind": kind,
        "model": model,
        "model_hash": model_hash,
        "prompt": prompt,
        "seed": seed,
        "parameters": dict(parameters or {}),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created)),
        "watermark": {"key_id": watermark_key_id} if watermark_key_id else None,
        "generator": "AIGC Studio",
        "digital_source_type": "trainedAlgorithmicMedia",  # IPTC term for AI-generated media
    }


def a1111_parameters(record: dict[str, Any]) -> str:
    """The A1111 `parameters` text: prompt line, then `Key: value, ...` (commas and newlines escaped)."""
    p = record.get("parameters") or {}
    values = {
        **p,
        "seed": record.get("seed"),
        "model": record.get("model"),
        "model_hash": record.get("model_hash"),
    }
    if "size" not in p and p.get("width") and p.get("height"):
        values["size"] = f"{p['width']}x{p['height']}"
    fields = [f"{name}: {_a1111_value(values[k])}" for k, name in A1111_FIELDS if values.get(k) is not None]
    if record.get("watermark"):
        fields.append(f"Watermark: {record['watermark']['key_id']}")
    label = p.get("label")  # class-conditional images: the label is their "prompt" (0 included)
    prompt = str(record.get("prompt") or ("" if label is None else label)).replace("\n", " ")
    return f"{prompt}\n{', '.join(fields)}" if fields else prompt


def _a1111_value(v: Any) -> str:
    s = str(v)
    return json.dumps(s) if ("," in s or ":" in s or "\n" in s) else s  # A1111 quotes such values


def parse_a1111(text: str) -> dict[str, str]:
    """Parse an A1111 `parameters` text back into {"prompt", field: value} (quoted values unquoted)."""
    lines = text.split("\n")
    head, last = lines[:-1], lines[-1]  # prompt (may span lines), then the `Key: value, ...` line
    neg = [ln for ln in head if ln.startswith("Negative prompt: ")]
    out = {"prompt": "\n".join(ln for ln in head if ln not in neg)}
    if neg:
        out["Negative prompt"] = neg[0].removeprefix("Negative prompt: ")
    i = 0
    while i < len(last):
        j = last.find(": ", i)
        if j < 0:
            break
        key = last[i:j].strip()
        i = j + 2
        if last[i : i + 1] == '"':
            end = i + 1
            while end < len(last) and (last[end] != '"' or last[end - 1] == "\\"):
                end += 1
            try:
                value = json.loads(last[i : end + 1])
            except json.JSONDecodeError:  # not our quoting: keep the raw text
                value = last[i + 1 : end]
            i = end + 1
        else:
            end = last.find(",", i)
            end = len(last) if end < 0 else end
            value = last[i:end]
            i = end
        out[key] = value
        i = last.find(",", i)
        i = len(last) if i < 0 else i + 1
    return out


# ---------------------------------------------------------------------------- PNG


def png_text_chunks(record: dict[str, Any]) -> dict[str, str]:
    """Text chunks for a PNG: the A1111 `parameters` line and the full `aigc` JSON record."""
    return {
        "parameters": a1111_parameters(record),
        "aigc": json.dumps(record, ensure_ascii=False, sort_keys=True),
    }


def save_png(image, path: str | Path, record: dict[str, Any], extra: dict[str, str] | None = None) -> Path:
    """Write a PIL image as PNG atomically with the provenance chunks (+ `extra` text chunks)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in {**(extra or {}), **png_text_chunks(record)}.items():
        info.add_itxt(k, v) if not v.isascii() else info.add_text(k, v)
    return atomic_write(path, lambda p: image.save(p, format="PNG", pnginfo=info))


def stamp_png(path: str | Path, record: dict[str, Any], out: str | Path | None = None) -> Path:
    """Add the provenance chunks to an existing PNG (in place unless `out`); other text chunks stay,
    the old `parameters` chunk moves to `aigc` record's `parameters` when it was our JSON."""
    image, chunks = open_png(path)
    old = chunks.pop("parameters", None)
    if old and not record.get("parameters"):
        with contextlib.suppress(json.JSONDecodeError):  # an A1111 line from elsewhere: not ours to parse
            record = {**record, "parameters": json.loads(old)}
    chunks.pop("aigc", None)
    return save_png(image, out or path, record, extra=chunks)


def stamp_image_files(paths: list[Path], model: str | Path | None = None, watermark: bool = False) -> None:
    """Give PNGs written by `aigc.generation.image_io` (JSON `parameters` chunk) their provenance:
    the `aigc` record + A1111 line, and with `watermark` the invisible key-id mark. In place."""
    from aigc.safety.watermark_image import embed
    from aigc.safety.watermark_text import load_config

    cfg = load_config() if watermark else None
    mhash = None
    if model is not None and (Path(model) / "model.safetensors").is_file():
        mhash = model_hash(model)
    for path in paths:
        image, chunks = open_png(path)
        try:
            params = json.loads(chunks.pop("parameters", "{}"))
        except json.JSONDecodeError:
            params = {}
        chunks.pop("aigc", None)
        if cfg is not None:
            image = embed(image, cfg)
        record = make_record(
            kind="image",
            model=str(params.get("model") or model),
            parameters=params,
            seed=params.get("seed"),
            prompt=params.get("prompt"),
            model_hash=mhash,
            watermark_key_id=cfg.key_id if cfg is not None else None,
        )
        save_png(image, path, record, extra=chunks)


def open_png(path: str | Path):
    """(PIL image fully decoded, its text chunks); a corrupted or truncated PNG is an AigcError."""
    from PIL import Image

    p = _check_file(path)
    with open(p, "rb") as f:
        if f.read(8) != PNG_MAGIC:
            raise AigcError(f"{p} is not a PNG file (bad signature); pass a .png written by aigc")
    try:
        with Image.open(p) as im:
            im.load()  # decodes every chunk: truncation and CRC errors surface here
            text = dict(getattr(im, "text", {}) or {})
            image = im.copy()
    except (OSError, SyntaxError, ValueError, zlib.error, Image.DecompressionBombError) as e:
        raise AigcError(f"{p} is a corrupted or truncated PNG ({e}); regenerate or re-download it") from None
    return image, text


def read_png_record(path: str | Path) -> tuple[dict[str, Any] | None, dict[str, str]]:
    """(the `aigc` record or None, all text chunks) of a PNG."""
    _, chunks = open_png(path)
    raw = chunks.get("aigc")
    if raw is None:
        return None, chunks
    try:
        return json.loads(raw), chunks
    except json.JSONDecodeError:
        raise AigcError(
            f"{path}: its 'aigc' metadata chunk is not valid JSON; the file was altered"
        ) from None


# ---------------------------------------------------------------------------- sidecars


def sidecar_path(path: str | Path) -> Path:
    p = Path(path)
    return p.with_name(p.name + SIDECAR_SUFFIX)


def write_sidecar(path: str | Path, record: dict[str, Any]) -> Path:
    """Write `<file>.aigc.json` beside a WAV / MIDI / text output (atomic), with the file's sha256
    so a later edit of the file is noticed."""
    p = _check_file(path)
    return atomic_write_json(sidecar_path(p), {**record, "file_sha256": _sha256(p)})


def file_hashes(paths: Iterable[Path]) -> dict[str, str]:
    """{file name: sha256} of the files one stem sidecar describes (a piece's .mid / .wav / .png), so
    `verify` notices a later edit of any of them; taken after the last write (a C2PA signature)."""
    return {p.name: _sha256(p) for p in paths}


def read_sidecar(path: str | Path) -> dict[str, Any] | None:
    s = sidecar_path(path)
    if not s.is_file():
        return None
    try:
        return json.loads(s.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise AigcError(f"{s} is not valid JSON; delete it or restore it from the original output") from None


def save_text(text: str, path: str | Path, record: dict[str, Any]) -> Path:
    """Write generated text (atomic) plus its sidecar."""
    p = atomic_write(path, lambda t: t.write_text(text, encoding="utf-8"))
    write_sidecar(p, record)
    return p


# ---------------------------------------------------------------------------- verify


def verify(path: str | Path, model: str | None = None, threshold: float = 4.0) -> dict[str, Any]:
    """Everything known about a file's origin: metadata, watermark detection, C2PA status.

    Text watermarks need the model (its tokenizer) -> `model`; images are tested for this
    deployment's image mark; other files report "not applicable".
    """
    p = _check_file(path)
    from aigc.safety import c2pa

    manifest = c2pa.read(p)  # none | valid | invalid | not checked, + signer, source type, ...
    report: dict[str, Any] = {"file": str(p), "bytes": p.stat().st_size, "c2pa": manifest["status"],
                              "c2pa_manifest": manifest}  # fmt: skip
    with open(p, "rb") as f:
        is_png = f.read(8) == PNG_MAGIC
    if is_png:
        record, chunks = read_png_record(p)
        report["type"] = "png"
        report["metadata_source"] = "png 'aigc' chunk" if record else "none"
        report["metadata"] = record
        params = chunks.get("parameters")
        if record is None and params:
            try:  # written by aigc.generation.image_io alone (e.g. the server): JSON parameters
                report["metadata"] = {"parameters": json.loads(params)}
                report["metadata_source"] = "png 'parameters' chunk (JSON)"
            except json.JSONDecodeError:  # another tool's A1111 line
                report["a1111"] = parse_a1111(params)
                report["metadata_source"] = "png 'parameters' chunk (A1111)"
        report["watermark"] = _image_watermark(p)
        return report
    record = read_sidecar(p)
    report["type"] = p.suffix.lstrip(".").lower() or "file"
    report["metadata_source"] = f"sidecar {sidecar_path(p).name}" if record else "none"
    stem_json = p.with_suffix(".json")
    if record is None and p.suffix.lower() in (".mid", ".midi", ".wav", ".png") and stem_json.is_file():
        # music outputs (`save_music`) and others written before provenance: `<stem>.json` beside
        with contextlib.suppress(json.JSONDecodeError, UnicodeDecodeError):
            found = json.loads(stem_json.read_text(encoding="utf-8"))
            record = found if isinstance(found, dict) else None
            report["metadata_source"] = f"sidecar {stem_json.name}" if record else "none"
    report["metadata"] = record
    if record and record.get("file_sha256"):
        report["file_unchanged"] = record["file_sha256"] == _sha256(p)
    elif record and isinstance(record.get("sha256"), dict) and p.name in record["sha256"]:
        report["file_unchanged"] = record["sha256"][p.name] == _sha256(p)  # a music sidecar: a hash per file
    report["watermark"] = (
        _text_watermark(p, model, threshold) if _is_text(p) else {"status": "not applicable"}
    )
    return report


def _text_watermark(p: Path, model: str | None, threshold: float) -> dict[str, Any]:
    if model is None:
        return {"status": "not tested (pass --model RUN: the tokenizer is needed)"}
    from aigc.generation import load_generator
    from aigc.safety.watermark_text import detect_text

    gen = load_generator(model)
    d = detect_text(p.read_text(encoding="utf-8"), gen, gen.decoder.vocab_size, threshold=threshold)
    return {"status": "detected" if d.detected else "not detected", **d.to_dict()}


def _image_watermark(p: Path) -> dict[str, Any]:
    try:
        from aigc.safety.watermark_image import detect_file
    except ImportError:
        return {"status": "not tested (image watermark unavailable)"}
    return detect_file(p)


def _is_text(p: Path) -> bool:
    if p.suffix.lower() in (".mid", ".midi", ".wav", ".png", ".gif", ".jpg", ".jpeg", ".safetensors"):
        return False
    try:
        p.read_bytes()[:65536].decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _check_file(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_file():
        raise AigcError(f"file {p} not found; pass the path of a generated output")
    size = p.stat().st_size
    if size > MAX_VERIFY_BYTES:
        raise AigcError(
            f"{p} is {size / 2**20:.0f} MiB; files over {MAX_VERIFY_BYTES // 2**20} MiB are not checked"
        )
    return p


def _sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()
