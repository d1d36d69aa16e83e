"""A streaming multipart/form-data reader: the file part goes straight to a `Spool`.

Starlette's form parser would first copy the file to its own temporary file; reading the body
ourselves keeps one pass (hash, count, write) and flat memory whatever the size.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from app.files.storage import Spool
from app.kit.errors import BadRequest, InvalidPayload, UnsupportedMediaType

MAX_FIELD_BYTES = 64 * 1024
MAX_FIELDS = 32


@dataclass
class MultipartForm:
    fields: dict[str, str] = field(default_factory=dict)
    spool: Spool | None = None
    filename: str | None = None
    content_type: str | None = None


class _Collector:
    def __init__(self, file_field: str, new_spool: Callable[[], Spool]) -> None:
        self.file_field = file_field
        self.new_spool = new_spool
        self.form = MultipartForm()
        self.ended = False
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._headers: dict[str, str] = {}
        self._name: str | None = None
        self._value: bytearray | None = None
        self._to_spool = False
        self._count = 0

    # python-multipart calls these synchronously while we feed it the body.
    def on_part_begin(self) -> None:
        self._headers = {}
        self._name = None
        self._value = None
        self._to_spool = False

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        name = bytes(self._header_name).decode("latin-1").strip().lower()
        self._headers[name] = bytes(self._header_value).decode("latin-1").strip()
        self._header_name.clear()
        self._header_value.clear()

    def on_headers_finished(self) -> None:
        self._count += 1
        if self._count > MAX_FIELDS:
            raise BadRequest(f"Too many form fields (at most {MAX_FIELDS}).")
        _, options = parse_options_header(self._headers.get("content-disposition", ""))
        raw_name = options.get(b"name")
        if raw_name is None:
            raise BadRequest("A multipart part has no name in its Content-Disposition header.")
        self._name = _decode_header_text(raw_name)
        raw_filename = options.get(b"filename*") or options.get(b"filename")
        if self._name == self.file_field:
            if self.form.spool is not None:
                raise InvalidPayload(
                    f"Only one '{self.file_field}' part is allowed.", param=self.file_field
                )
            self.form.spool = self.new_spool()
            self.form.filename = None if raw_filename is None else _decode_filename(raw_filename)
            self.form.content_type = self._headers.get("content-type")
            self._to_spool = True
        else:
            if self._name in self.form.fields:
                raise InvalidPayload(f"Field '{self._name}' was given twice.", param=self._name)
            self._value = bytearray()

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._to_spool:
            assert self.form.spool is not None
            self.form.spool.write(memoryview(data)[start:end])
        elif self._value is not None:
            self._value += data[start:end]
            if len(self._value) > MAX_FIELD_BYTES:
                raise InvalidPayload(
                    f"Field '{self._name}' is longer than {MAX_FIELD_BYTES} bytes.",
                    param=self._name,
                )

    def on_part_end(self) -> None:
        if self._value is not None and self._name is not None:
            try:
                self.form.fields[self._name] = self._value.decode("utf-8")
            except UnicodeDecodeError:
                raise BadRequest(
                    f"Field '{self._name}' is not valid UTF-8.", param=self._name
                ) from None
        self._value = None
        self._to_spool = False

    def on_end(self) -> None:
        self.ended = True


def _decode_header_text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


_WHATWG_ESCAPES = {"%22": '"', "%0d": "\r", "%0a": "\n"}


def _decode_filename(raw: bytes) -> str:
    text = _decode_header_text(raw)
    # Browsers and httpx escape these three in form-data filenames (WHATWG); undo that so the
    # sanitiser sees the real characters.
    text = re.sub(r"%(22|0[dD]|0[aA])", lambda m: _WHATWG_ESCAPES[m.group(0).lower()], text)
    # RFC 5987 form: filename*=UTF-8''name%20with%20spaces
    if "''" in text and text.split("''", 1)[0].lower() in {"utf-8", "iso-8859-1"}:
        from urllib.parse import unquote

        return unquote(text.split("''", 1)[1])
    return text


async def read_multipart(
    request: Request, *, file_field: str, new_spool: Callable[[], Spool]
) -> MultipartForm:
    """Read the whole multipart body; on any error the spooled file is removed."""
    content_type, options = parse_options_header(request.headers.get("content-type"))
    if content_type != b"multipart/form-data":
        raise UnsupportedMediaType(
            "This endpoint takes multipart/form-data (a file upload), not "
            f"{content_type.decode('latin-1') or 'an unspecified content type'}."
        )
    boundary = options.get(b"boundary")
    if not boundary:
        raise BadRequest("The multipart Content-Type header has no boundary.")
    collector = _Collector(file_field, new_spool)
    callbacks = {
        name: getattr(collector, name)
        for name in (
            "on_part_begin",
            "on_part_data",
            "on_part_end",
            "on_header_field",
            "on_header_value",
            "on_header_end",
            "on_headers_finished",
            "on_end",
        )
    }
    try:
        parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
        if not collector.ended:
            raise BadRequest("The multipart body ended before its closing boundary.")
    except ClientDisconnect:
        _discard(collector.form)
        raise BadRequest("The client disconnected before sending the whole body.") from None
    except FormParserError as exc:
        _discard(collector.form)
        raise BadRequest(f"Malformed multipart body: {exc}") from None
    except BaseException:
        _discard(collector.form)
        raise
    return collector.form


def _discard(form: MultipartForm) -> None:
    if form.spool is not None:
        form.spool.discard()
