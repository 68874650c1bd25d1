"""Office documents: macros (VBA and Excel 4 XLM) and encryption, with oletools.

`examine` is asked about an attachment or archive member that is an OLE2 file
(.doc, .xls, .ppt, .msg), an OOXML zip (.docm, .xlsm) or is named like an Office
document. oletools' VBA_Parser reads it from memory; nothing touches the disk.
A document oletools cannot parse is `unreadable`, not clean: hostile documents
are made to break parsers.
"""

from __future__ import annotations

import logging

import attrs

# oletools logs every oddity of every document at WARNING or worse: ours is the verdict
for _name in ("olevba", "olefile", "oletools", "crypto", "msoffcrypto", "ppt_parser", "xls_parser"):
    logging.getLogger(_name).setLevel(logging.CRITICAL)


@attrs.frozen
class OfficeReport:
    macros: bool = False
    encrypted: bool = False
    unreadable: str | None = None  # why oletools could not read it


def examine(name: str, payload: bytes) -> OfficeReport:
    """What an Office document holds: macros, encryption; or why it could not be read."""
    import olefile
    from oletools import crypto, olevba

    if payload[:8] == olefile.MAGIC:
        try:
            with olefile.OleFileIO(payload) as ole:
                if crypto.is_encrypted(ole):
                    return OfficeReport(encrypted=True)
        except Exception as error:  # olefile raises anything on hostile bytes
            return OfficeReport(unreadable=_describe(error))
    try:
        parser = olevba.VBA_Parser(name or "attachment", data=payload)
    except olevba.FileOpenError:
        return OfficeReport()  # not a format oletools knows: no macros it could find
    except Exception as error:
        return OfficeReport(unreadable=_describe(error))
    try:
        macros = bool(parser.detect_vba_macros()) or bool(parser.detect_xlm_macros())
    except Exception as error:
        return OfficeReport(unreadable=_describe(error))
    finally:
        parser.close()
    return OfficeReport(macros=macros)


def _describe(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return f"cannot be read: {text[:200]}"
