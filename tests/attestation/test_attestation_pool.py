"""QuoteVerifierPool: same answers as in-process verification, off the event loop, robust."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import signal
from collections.abc import Iterator

import pytest
from attestation_vectors import SGX_AT
from hypothesis import given, settings
from hypothesis import strategies as st

from marblekeep.attestation.claims import TeeClaims, TeeKind
from marblekeep.attestation.dcap import (
    Collateral,
    QuoteVerifierPool,
    claims_from_json,
    claims_to_json,
    decode_request,
    encode_request,
    verify_quote,
)
from marblekeep.attestation.evidence import add_oe_header
from marblekeep.errors import AttestationError, CollateralError, ConfigError

EXPIRED = dt.datetime(2025, 8, 1, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def pool() -> Iterator[QuoteVerifierPool]:
    with QuoteVerifierPool(2) as shared:
        shared.start()
        yield shared


async def test_same_claims_as_in_process(
    pool: QuoteVerifierPool,
    sgx_quote: bytes,
    sgx_collateral: Collateral,
    tdx_quote: bytes,
    tdx_collateral: Collateral,
) -> None:
    assert await pool.verify(sgx_quote, sgx_collateral, SGX_AT) == verify_quote(
        sgx_quote, sgx_collateral, SGX_AT
    )
    assert await pool.verify(add_oe_header(sgx_quote), sgx_collateral, SGX_AT) == verify_quote(
        sgx_quote, sgx_collateral, SGX_AT
    )
    tdx = await pool.verify(tdx_quote, tdx_collateral, SGX_AT)
    assert tdx == verify_quote(tdx_quote, tdx_collateral, SGX_AT) and tdx.kind is TeeKind.TDX


async def test_errors_keep_their_class_and_message(
    pool: QuoteVerifierPool, sgx_quote: bytes, sgx_collateral: Collateral
) -> None:
    with pytest.raises(CollateralError) as remote:
        await pool.verify(sgx_quote, sgx_collateral, EXPIRED)
    with pytest.raises(CollateralError) as local:
        verify_quote(sgx_quote, sgx_collateral, EXPIRED)
    assert remote.value.message == local.value.message
    assert remote.value.message.startswith("collateral expired 2025-07-19T10:01:18Z")
    tampered = bytearray(sgx_quote)
    tampered[200] ^= 1
    with pytest.raises(AttestationError, match="quote verification failed") as info:
        await pool.verify(bytes(tampered), sgx_collateral, SGX_AT)
    assert type(info.value) is AttestationError
    with pytest.raises(ConfigError):
        await pool.verify(sgx_quote, sgx_collateral, dt.datetime(2025, 6, 25))


async def test_many_concurrent_mixed_requests_each_get_their_answer(
    pool: QuoteVerifierPool,
    sgx_quote: bytes,
    sgx_collateral: Collateral,
    tdx_quote: bytes,
    tdx_collateral: Collateral,
) -> None:
    bad = bytearray(sgx_quote)
    bad[300] ^= 0x80
    jobs = []
    for i in range(120):
        kind = i % 4
        if kind == 0:
            jobs.append((sgx_quote, sgx_collateral, SGX_AT, "sgx"))
        elif kind == 1:
            jobs.append((tdx_quote, tdx_collateral, SGX_AT, "tdx"))
        elif kind == 2:
            jobs.append((bytes(bad), sgx_collateral, SGX_AT, "bad"))
        else:
            jobs.append((sgx_quote, sgx_collateral, EXPIRED, "expired"))
    results = await asyncio.gather(*(pool.verify(q, c, at) for q, c, at, _ in jobs), return_exceptions=True)
    for (_q, _c, _at, expect), result in zip(jobs, results, strict=True):
        if expect == "sgx":
            assert isinstance(result, TeeClaims) and result.kind is TeeKind.SGX
        elif expect == "tdx":
            assert isinstance(result, TeeClaims) and result.kind is TeeKind.TDX
        elif expect == "bad":
            assert type(result) is AttestationError
        else:
            assert isinstance(result, CollateralError)


async def test_cancelled_caller_does_not_disturb_others(
    pool: QuoteVerifierPool, sgx_quote: bytes, sgx_collateral: Collateral
) -> None:
    tasks = [asyncio.ensure_future(pool.verify(sgx_quote, sgx_collateral, SGX_AT)) for _ in range(20)]
    tasks[3].cancel()
    tasks[11].cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[3], asyncio.CancelledError) and isinstance(results[11], asyncio.CancelledError)
    assert sum(isinstance(r, TeeClaims) for r in results) == 18


async def test_event_loop_stays_responsive(
    pool: QuoteVerifierPool, sgx_quote: bytes, sgx_collateral: Collateral
) -> None:
    """While 200 verifications run in the workers, the loop runs other tasks.

    Event-ordered, not timed: the 200 tasks are scheduled before this one resumes from its yield. A
    verification done on the event loop would run to completion in its task's first step, so all
    200 would be done when this task resumes; handed to the pool, none can be (a worker's result
    comes back through a callback queued after this task's resumption). Another task then runs to
    completion while the verifications are still pending.
    """
    tasks = [asyncio.ensure_future(pool.verify(sgx_quote, sgx_collateral, SGX_AT)) for _ in range(200)]
    await asyncio.sleep(0)
    assert not any(t.done() for t in tasks), "a verification ran on the event loop"
    other_ran = asyncio.Event()

    async def other() -> None:
        other_ran.set()

    await asyncio.ensure_future(other())
    assert other_ran.is_set()
    results = await asyncio.gather(*tasks)
    assert all(isinstance(r, TeeClaims) for r in results)


async def test_dead_worker_fails_its_requests_and_is_replaced(
    sgx_quote: bytes, sgx_collateral: Collateral
) -> None:
    with QuoteVerifierPool(1) as own:
        own.start()
        victim = own._pool[0].proc
        tasks = [asyncio.ensure_future(own.verify(sgx_quote, sgx_collateral, SGX_AT)) for _ in range(50)]
        await asyncio.sleep(0)  # let the dispatch send them
        await asyncio.sleep(0)
        os.kill(victim.pid, signal.SIGKILL)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        assert failures, "the killed worker had requests in flight"
        assert all(isinstance(f, AttestationError) and "worker exited" in f.message for f in failures)
        # a fresh worker takes over
        claims = await own.verify(sgx_quote, sgx_collateral, SGX_AT)
        assert claims.tcb_status == "ConfigurationAndSWHardeningNeeded"
        assert own._pool[0].proc.pid != victim.pid


async def test_close_fails_pending_and_refuses_new_work(sgx_quote: bytes, sgx_collateral: Collateral) -> None:
    own = QuoteVerifierPool(1)
    tasks = [asyncio.ensure_future(own.verify(sgx_quote, sgx_collateral, SGX_AT)) for _ in range(30)]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    own.close()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, TeeClaims | AttestationError) for r in results)
    with pytest.raises(ConfigError, match="after close"):
        await own.verify(sgx_quote, sgx_collateral, SGX_AT)


def test_bad_pool_settings() -> None:
    with pytest.raises(ConfigError):
        QuoteVerifierPool(0)
    with pytest.raises(ConfigError):
        QuoteVerifierPool(1, max_batch=0)


@settings(max_examples=100, deadline=None)
@given(
    collaterals=st.lists(st.binary(max_size=64), min_size=1, max_size=3),
    items=st.lists(
        st.tuples(
            st.integers(0, 2),
            st.datetimes(
                min_value=dt.datetime(1971, 1, 1),
                max_value=dt.datetime(2200, 1, 1),
                timezones=st.just(dt.UTC),
            ),
            st.binary(max_size=128),
        ),
        max_size=5,
    ),
    batch_id=st.integers(0, 2**32 - 1),
)
def test_wire_format_round_trip(
    collaterals: list[bytes], items: list[tuple[int, dt.datetime, bytes]], batch_id: int
) -> None:
    items = [(i % len(collaterals), at, q) for i, at, q in items]
    frame = encode_request(batch_id, collaterals, items)
    assert int.from_bytes(frame[:4], "little") == len(frame) - 4
    assert int.from_bytes(frame[4:8], "little") == batch_id
    assert decode_request(frame[8:]) == (collaterals, items)


def test_claims_json_round_trip(
    sgx_quote: bytes, sgx_collateral: Collateral, tdx_quote: bytes, tdx_collateral: Collateral
) -> None:
    for claims in (
        verify_quote(sgx_quote, sgx_collateral, SGX_AT),
        verify_quote(tdx_quote, tdx_collateral, SGX_AT),
    ):
        assert claims_from_json(claims_to_json(claims)) == claims
