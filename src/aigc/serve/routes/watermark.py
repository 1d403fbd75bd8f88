"""Watermark detection and provenance checks over HTTP (`aigc detect` and `aigc verify` as routes).

    POST /v1/watermark/detect   JSON {"text", "model"}        -> the text mark: z_score, p_value,
                                                                 green_fraction, tokens_scored, detected
                                JSON {"image": "<base64>"} or multipart `file`
                                                              -> the image mark: bit_accuracy,
                                                                 matched_bits, key_id_match, detected
    POST /v1/verify             multipart `file` (+ `model`)  -> the `aigc verify` report: metadata,
                                                                 watermark, C2PA status

The key is the deployment's (`$AIGC_WATERMARK_KEY`, else `$AIGC_HOME/watermark.key`): content
marked with another key reads as "not detected", with its score, like unmarked content. A text is
scored with the tokenizer of `model` (a model this server serves: its id, never a path).
Uploads may be up to MAX_UPLOAD_BYTES (413 before anything is read) and images up to
MAX_UPLOAD_PIXELS (413); a corrupted or truncated image is 400 `invalid_image`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import re
import tempfile
import zlib
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import Field, ValidationError, model_validator

from aigc.serve import settings as S
from aigc.serve.app import ApiError, json_content, not_json_message
from aigc.serve.schemas import ErrorResponse, ModelName, Strict

router = APIRouter(tags=["safety"])
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 422)}
UPLOAD = {
    "type": "object",
    "properties": {"file": {"type": "string", "format": "binary"}},
    "required": ["file"],
}


def _body_doc(json_schema: dict[str, Any] | None, form: dict[str, Any]) -> dict[str, Any]:
    """The request body for /openapi.json (the routes read JSON or multipart themselves)."""
    content = {"multipart/form-data": {"schema": form}}
    if json_schema is not None:
        content["application/json"] = {"schema": json_schema}
    return {"requestBody": {"required": True, "content": content}}


SUFFIX = re.compile(r"\.[A-Za-z0-9]{1,8}$")  # an upload's extension, kept so verify knows the type


class DetectRequest(Strict):
    """Exactly one of `text` (with `model`) or `image` (base64 of a PNG / JPEG file)."""

    text: Annotated[str, Field(max_length=S.MAX_DETECT_CHARS)] | None = None
    model: ModelName | None = None
    image: Annotated[str, Field(max_length=S.MAX_UPLOAD_BYTES * 4 // 3 + 4)] | None = None
    threshold: float = Field(4.0, gt=0.0, le=100.0)  # z-score above which a text is marked
    ignore_repeated: bool = False  # count each (context, token) pair once

    @model_validator(mode="after")
    def _one_kind(self) -> DetectRequest:
        if (self.text is None) == (self.image is None):
            raise ValueError("send either text (with model) or image (base64), not both or neither")
        if self.text is not None and self.model is None:
            raise ValueError("text detection needs model: the id of the model that wrote it")
        return self


async def _body(request: Request) -> tuple[dict[str, Any], bytes | None]:
    """(form or JSON fields, uploaded file bytes or None) of a multipart or JSON request."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await request.form()
        fields, data = {}, None
        for key, value in form.multi_items():
            if hasattr(value, "read"):  # an UploadFile
                if key != "file" or data is not None:
                    raise ApiError(
                        400, f"unexpected upload {key!r}; send one file as 'file'", "invalid_value", key
                    )
                data = await value.read()
                fields["filename"] = value.filename or ""
            else:
                fields[key] = value
        return fields, data
    content_type = request.headers.get("content-type")
    if not json_content(content_type):  # (a form or text/plain: what a cross-site page sends unasked)
        raise ApiError(
            415, not_json_message(content_type) + " (or a multipart upload)", "unsupported_media_type"
        )
    try:
        body = await request.json()
    except ValueError:
        raise ApiError(
            422, "malformed JSON body; send a JSON object or a multipart upload", "invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise ApiError(422, "the body must be a JSON object", "invalid_type")
    return body, None


def open_image(data: bytes) -> Any:
    """A fully decoded PIL image from upload bytes; too many pixels -> 413, unreadable -> 400."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > S.MAX_UPLOAD_PIXELS:
                raise ApiError(413, f"image is {im.width}x{im.height}: over {S.MAX_UPLOAD_PIXELS} pixels; "
                               "send a smaller image", "image_too_large", "file")  # fmt: skip
            im.load()  # decodes everything: truncation and CRC errors surface here
            return im.copy()
    except ApiError:
        raise
    except (
        UnidentifiedImageError,
        OSError,
        SyntaxError,
        ValueError,
        zlib.error,
        Image.DecompressionBombError,
    ) as e:
        raise ApiError(400, f"the image is corrupted, truncated or not an image ({e}); send a PNG or JPEG file",
                       "invalid_image", "file") from None  # fmt: skip


def _check_pixels(data: bytes) -> None:
    """413 for an image over MAX_UPLOAD_PIXELS, read from its header alone (nothing decoded)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
    except Exception:  # not an image (or unreadable): verify reports or refuses it itself
        return
    if w * h > S.MAX_UPLOAD_PIXELS:
        raise ApiError(413, f"image is {w}x{h}: over {S.MAX_UPLOAD_PIXELS} pixels; send a smaller image",
                       "image_too_large", "file")  # fmt: skip


def detect_image(data: bytes) -> dict[str, Any]:
    from aigc.safety.watermark_image import detect

    d = detect(open_image(data)).to_dict()
    return {"object": "watermark.detection", "kind": "image", **d, "key_id_match": d["detected"]}


def detect_text(lm: Any, body: DetectRequest) -> dict[str, Any]:
    from aigc.safety.watermark_text import detect_text as detect

    gen = lm.generator
    d = detect(body.text, gen, gen.decoder.vocab_size, threshold=body.threshold,
               ignore_repeated=body.ignore_repeated).to_dict()  # fmt: skip
    return {
        "object": "watermark.detection",
        "kind": "text",
        "model": lm.entry.id,
        **d,
        "tokens_scored": d["scored"],
    }


@router.post("/v1/watermark/detect", summary="Detect this deployment's text or image watermark", responses=ERRORS,
             openapi_extra=_body_doc(DetectRequest.model_json_schema(), UPLOAD))  # fmt: skip
async def watermark_detect(request: Request) -> dict[str, Any]:
    fields, upload = await _body(request)
    if upload is not None:
        if set(fields) - {"filename"}:
            raise ApiError(400, "a multipart upload takes only 'file'; send text as JSON", "invalid_value")
        return await asyncio.to_thread(detect_image, upload)
    try:
        body = DetectRequest.model_validate(fields)
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False)) from None
    if body.image is not None:
        try:
            data = base64.b64decode(body.image, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "image is not valid base64; send the file's bytes base64-encoded", "invalid_image",
                           "image") from None  # fmt: skip
        return await asyncio.to_thread(detect_image, data)
    lm = await asyncio.to_thread(request.app.state.registry.get, body.model, "text")
    return await asyncio.to_thread(detect_text, lm, body)


def verify_upload(data: bytes, filename: str, lm: Any | None) -> dict[str, Any]:
    """`aigc.safety.provenance.verify` on an upload (a temp file that is removed afterwards)."""
    from aigc.safety.provenance import verify

    _check_pixels(data)
    suffix = m.group(0).lower() if (m := SUFFIX.search(filename)) else ""
    with tempfile.TemporaryDirectory(prefix="aigc-verify-") as d:
        path = Path(d) / f"upload{suffix}"
        path.write_bytes(data)
        report = verify(path)
        status = (report.get("watermark") or {}).get("status", "")
        text = report.get("type") != "png" and status.startswith("not tested")  # a text: needs a tokenizer
        if text and lm is not None:
            from aigc.safety.watermark_text import detect_text as detect

            gen = lm.generator
            det = detect(path.read_text(encoding="utf-8"), gen, gen.decoder.vocab_size)
            report["watermark"] = {"status": "detected" if det.detected else "not detected", **det.to_dict()}
        elif text:
            report["watermark"] = {
                "status": "not tested (send model: the id of the model whose tokenizer scores it)"
            }
    return {"object": "verification", **report, "file": filename}


@router.post("/v1/verify", summary="Provenance of a file: metadata, watermark, C2PA", responses=ERRORS,
             openapi_extra=_body_doc(None, {**UPLOAD, "properties": {**UPLOAD["properties"], "model": {"type": "string"}}}))  # fmt: skip
async def verify_file(request: Request) -> dict[str, Any]:
    fields, upload = await _body(request)
    if upload is None:
        raise ApiError(400, "send the file as a multipart upload named 'file'", "invalid_value", "file")
    unknown = sorted(set(fields) - {"filename", "model"})
    if unknown:
        raise ApiError(
            422, f"unknown field {unknown[0]!r}; allowed: file, model", "unknown_field", unknown[0]
        )
    lm = None
    if fields.get("model"):
        lm = await asyncio.to_thread(request.app.state.registry.get, str(fields["model"]), "text")
    return await asyncio.to_thread(verify_upload, upload, str(fields.get("filename") or "upload"), lm)
