"""Worker process of :class:`marblekeep.attestation.dcap.QuoteVerifierPool`.

Started by the pool as ``python -m marblekeep.attestation.verifier_worker``; reads request
frames on stdin, answers on stdout (wire format in :mod:`marblekeep.attestation.dcap`), and
exits when stdin closes. File descriptor 1 is moved away so that stray prints of any
library cannot corrupt the protocol.
"""

from __future__ import annotations

import os
import struct
import sys

from marblekeep.attestation.dcap import verify_batch


def _read_exactly(fd: int, size: int) -> bytes | None:
    chunks: list[bytes] = []
    remaining = size
    while remaining:
        chunk = os.read(fd, remaining)
        if not chunk:
            return None
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def main() -> int:
    in_fd = sys.stdin.fileno()
    out_fd = os.dup(sys.stdout.fileno())
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # prints now go to stderr
    while True:
        head = _read_exactly(in_fd, 8)
        if head is None:
            return 0
        length, batch_id = struct.unpack("<II", head)
        payload = _read_exactly(in_fd, length - 4)
        if payload is None:
            return 0
        answer = verify_batch(payload)
        _write_all(out_fd, struct.pack("<II", len(answer) + 4, batch_id) + answer)


if __name__ == "__main__":
    sys.exit(main())
