"""Byte flips anywhere in the SQLite file: never a different value, only refusal, recovery or the original.

Positions: every byte of the SQLite header and of every page header, every non-zero byte
(cell pointers, keys, values, the wrapped DEK, the sealed index, the revision), and every
8th byte of the rest (random phase), so the whole file range is covered.
"""

from __future__ import annotations

import logging
import os
import random
import struct
from pathlib import Path

import pytest

from marblekeep.errors import SealError, StoreError
from marblekeep.store import NeedsRecovery, Opened, SimulationKeyFileProvider, SQLiteStore, open_sealed_store


async def _build(db: Path, provider: SimulationKeyFileProvider, dek: bytes) -> dict[str, bytes]:
    result = await open_sealed_store(await SQLiteStore.open(db), provider)
    assert isinstance(result, Opened)
    store = result.store
    values = {
        "manifest": b'{"Packages":{}}' * 3,
        "secret:db": b"db-password-0123456789",
        "secret:api": os.urandom(32),
        "secretX": b"neighbour",
        "activations:backend": b"a",
        "user:alice": b"cert-der" * 8,
        "rootSecret": os.urandom(32),
    }
    for key, value in values.items():
        await store.commit({key: value}, expected_revision=await store.revision())
    await store.rekey(dek, recovery_data=b'{"00ff":true}')
    await store.commit({"secret:db": b"db-password-rotated"}, expected_revision=await store.revision())
    values["secret:db"] = b"db-password-rotated"
    await store.close()
    return values


def _positions(data: bytes, rnd: random.Random) -> list[int]:
    page_size = struct.unpack(">H", data[16:18])[0]
    page_size = 65536 if page_size == 1 else page_size
    chosen = set(range(100))
    for page in range(0, len(data), page_size):
        start = page + (100 if page == 0 else 0)
        chosen.update(range(start, min(start + 12, len(data))))
    chosen.update(i for i, b in enumerate(data) if b)
    phase = rnd.randrange(8)
    chosen.update(range(phase, len(data), 8))
    return sorted(chosen)


async def test_every_byte_flip_is_refused_recovered_or_harmless(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.CRITICAL, logger="marblekeep.seal")
    provider = SimulationKeyFileProvider(tmp_path / "kek")
    dek = os.urandom(32)
    original = await _build(tmp_path / "state.db", provider, dek)
    data = (tmp_path / "state.db").read_bytes()
    assert provider.anchor_path is not None
    anchor_bytes = provider.anchor_path.read_bytes()
    rnd = random.Random(4)
    positions = _positions(data, rnd)
    assert positions[0] == 0 and positions[-1] >= len(data) - 8
    outcomes: dict[str, int] = {}
    target = tmp_path / "flipped.db"
    for pos in positions:
        flipped = bytearray(data)
        flipped[pos] ^= rnd.randrange(1, 256)
        for suffix in ("-wal", "-shm"):
            Path(f"{target}{suffix}").unlink(missing_ok=True)
        target.write_bytes(bytes(flipped))
        provider.anchor_path.write_bytes(anchor_bytes)
        try:
            inner = await SQLiteStore.open(target)
        except StoreError:
            outcomes["store-error"] = outcomes.get("store-error", 0) + 1
            continue
        try:
            result = await open_sealed_store(inner, provider)
            if isinstance(result, Opened):
                assert not result.fresh, f"flip at {pos}: silently reset to a fresh state"
                got = await result.store.list("")
                assert got == original, f"flip at {pos}: loaded different values"
                outcomes["original"] = outcomes.get("original", 0) + 1
            else:
                assert isinstance(result, NeedsRecovery)
                # even recovering with the right DEK must not produce different values
                try:
                    recovered = await result.recovery.complete(dek)
                except (SealError, StoreError):
                    outcomes["recovery-refused"] = outcomes.get("recovery-refused", 0) + 1
                else:
                    assert await recovered.list("") == original, f"flip at {pos}: recovery gave other values"
                    outcomes["recovery"] = outcomes.get("recovery", 0) + 1
        except (SealError, StoreError) as exc:
            name = type(exc).__name__
            outcomes[name] = outcomes.get(name, 0) + 1
        finally:
            await inner.close()
    print(len(positions), len(data), outcomes)
    assert sum(outcomes.values()) == len(positions)
    # the flips did reach the interesting parts: authentication failures and recovery both happened
    assert outcomes.get("IntegrityError", 0) > 100
    assert outcomes.get("recovery", 0) + outcomes.get("recovery-refused", 0) > 10
    assert outcomes.get("original", 0) > 0
