"""Byte layout of DCAP quotes: the OE header, the quote header and the report bodies.

Pure module (no I/O). Nothing here *verifies* anything: :func:`read_report` must only be
called on a quote that :func:`marblekeep.attestation.dcap.verify_quote` has verified, so
that the fields it returns are facts.

Layouts (little-endian):

* OE header (Gramine/Occlum premains prepend it): u32 version = 1, u32 type = 2,
  u64 length of the quote that follows.
* Quote header, 48 bytes: u16 version, u16 attestation key type, u32 TEE type
  (0 = SGX, 0x81 = TDX), u16 QE SVN, u16 PCE SVN, 16 bytes QE vendor ID, 20 bytes user data.
* Body: at offset 48 for quote versions 3 and 4; for version 5 a u16 body type and a u32 body
  size at 48 and the body at 54.
* SGX enclave report (384 bytes): attributes at 48 (flags u64, DEBUG = 0x2), MRENCLAVE at 64,
  MRSIGNER at 128, ISVPRODID u16 at 256, ISVSVN u16 at 258, report data at 320.
* TD report (584 bytes, 1.0 prefix of 1.5): MRSEAM at 16, TD attributes at 120 (bit 0 =
  DEBUG), MRTD at 136, RTMR0..3 at 328/376/424/472, report data at 520.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from marblekeep.attestation.claims import TeeClaims, TeeKind
from marblekeep.errors import AttestationError

__all__ = [
    "OE_HEADER_SIZE",
    "QUOTE_HEADER_SIZE",
    "QuoteHeader",
    "add_oe_header",
    "parse_header",
    "read_report",
    "strip_oe_header",
]

OE_HEADER_SIZE = 16
QUOTE_HEADER_SIZE = 48
TEE_TYPE_SGX = 0x00000000
TEE_TYPE_TDX = 0x00000081

_SGX_REPORT_SIZE = 384
_TD_REPORT_SIZE = 584


@dataclass(frozen=True)
class QuoteHeader:
    version: int
    attestation_key_type: int
    tee_type: int
    qe_svn: int
    pce_svn: int

    @property
    def kind(self) -> TeeKind:
        return TeeKind.TDX if self.tee_type == TEE_TYPE_TDX else TeeKind.SGX


def strip_oe_header(evidence: bytes) -> bytes:
    """Return the raw quote: ``evidence`` without Open Enclave's 16-byte header, if it has one.

    A raw quote starts with its u16 version (3, 4 or 5) and can never look like the header's
    u32 version 1 followed by u32 type 2, so the two forms are told apart unambiguously.
    """
    if len(evidence) >= OE_HEADER_SIZE:
        version, kind, length = struct.unpack_from("<IIQ", evidence, 0)
        if version == 1 and kind == 2:
            actual = len(evidence) - OE_HEADER_SIZE
            if length != actual:
                raise AttestationError(
                    f"quote: the Open Enclave header announces {length} bytes of quote but {actual} follow;"
                    " send the quote exactly as the quoting library produced it"
                )
            return evidence[OE_HEADER_SIZE:]
    return evidence


def add_oe_header(quote: bytes) -> bytes:
    """Prepend Open Enclave's header (what MarbleRun's sign-quote does with a raw SGX quote)."""
    return struct.pack("<IIQ", 1, 2, len(quote)) + quote


def parse_header(quote: bytes) -> QuoteHeader:
    """Decode the 48-byte quote header of a raw quote (no OE header)."""
    if len(quote) < QUOTE_HEADER_SIZE:
        raise AttestationError(
            f"quote: {len(quote)} bytes is too short for a DCAP quote (the header alone is"
            f" {QUOTE_HEADER_SIZE} bytes); send the complete SGX or TDX quote"
        )
    version, key_type, tee_type, qe_svn, pce_svn = struct.unpack_from("<HHIHH", quote, 0)
    return QuoteHeader(version, key_type, tee_type, qe_svn, pce_svn)


def _body(quote: bytes, header: QuoteHeader) -> tuple[int, int]:
    """Offset and expected size of the report body."""
    if header.version in (3, 4):
        offset = QUOTE_HEADER_SIZE
        size = _TD_REPORT_SIZE if header.tee_type == TEE_TYPE_TDX else _SGX_REPORT_SIZE
    elif header.version == 5:
        if len(quote) < QUOTE_HEADER_SIZE + 6:
            raise AttestationError("quote: a version 5 quote is truncated before its body descriptor")
        body_type, _body_size = struct.unpack_from("<HI", quote, QUOTE_HEADER_SIZE)
        offset = QUOTE_HEADER_SIZE + 6
        if body_type == 1:
            size = _SGX_REPORT_SIZE
        elif body_type in (2, 3, 4):
            size = _TD_REPORT_SIZE  # TD report 1.0 layout is a prefix of 1.5 / 1.5ex
        else:
            raise AttestationError(f"quote: unknown version 5 body type {body_type}")
    else:
        raise AttestationError(
            f"quote: version {header.version} is not supported; expected an SGX quote v3 or a TDX quote v4/v5"
        )
    if len(quote) < offset + size:
        raise AttestationError(f"quote: {len(quote)} bytes is too short for its report body")
    return offset, size


def read_report(quote: bytes, *, tcb_status: str = "", advisory_ids: tuple[str, ...] = ()) -> TeeClaims:
    """Read the report body of a *verified* raw quote into :class:`TeeClaims`."""
    header = parse_header(quote)
    offset, _size = _body(quote, header)
    body = memoryview(quote)[offset:]
    if header.kind is TeeKind.TDX:
        td_attributes = int.from_bytes(body[120:128], "little")
        return TeeClaims(
            kind=TeeKind.TDX,
            report_data=bytes(body[520:584]),
            tcb_status=tcb_status,
            advisory_ids=advisory_ids,
            debug=bool(td_attributes & 0x1),
            mrtd=body[136:184].hex(),
            rtmrs=tuple(body[start : start + 48].hex() for start in (328, 376, 424, 472)),
            mrseam=body[16:64].hex(),
        )
    flags = int.from_bytes(body[48:56], "little")
    prod_id, svn = struct.unpack_from("<HH", body, 256)
    return TeeClaims(
        kind=TeeKind.SGX,
        report_data=bytes(body[320:384]),
        tcb_status=tcb_status,
        advisory_ids=advisory_ids,
        debug=bool(flags & 0x2),
        mrenclave=body[64:96].hex(),
        mrsigner=body[128:160].hex(),
        isv_prod_id=prod_id,
        isv_svn=svn,
    )
