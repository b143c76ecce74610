"""What every reader shares: the text of a record, UTF-8 decoding that names the place, templates.

The bottom of ``jaxlm.data``: it imports no other module of the package, so readers of any
kind (``sources``, ``tfds_source``) use it without importing each other.
"""

from __future__ import annotations

import re

from jaxlm.errors import DataError


def decode_utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: invalid UTF-8 at byte {e.start} ({data[e.start:e.start + 4]!r})") from None


def template_fields(column: str) -> list[str]:
    """The fields a ``text_column`` reads: one name, or the ``{fields}`` of a ``str.format`` template."""
    return re.findall(r"\{(\w+)", column) if "{" in column else [column]


def text_of(record: dict, column: str, where: str) -> str:
    """The document text of a record: one field, or a ``str.format`` template over its fields."""
    if "{" in column:
        try:
            return column.format_map(record)
        except (KeyError, IndexError) as e:
            raise DataError(f"{where}: field {e} of the template {column!r} is missing; "
                            f"fields: {', '.join(map(str, record))}") from None
    if column not in record:
        raise DataError(f"{where}: no {column!r} field; fields: {', '.join(map(str, record))}; "
                        f"set data.text_column")
    text = record[column]
    if isinstance(text, bytes):
        text = decode_utf8(text, where)
    if not isinstance(text, str):
        raise DataError(f"{where}: field {column!r} is {type(text).__name__}, not text")
    return text
