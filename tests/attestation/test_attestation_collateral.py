"""Collateral: the PCCS fetch path against a local HTTP server, the directory source, the cache.

The local server speaks Intel's PCS/PCCS API v4 and serves the vectors' collateral, so the
fetched collateral must verify the real quotes. Clocks are pinned.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import logging
import os
import shutil
import urllib.parse
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from aiohttp import web
from attestation_vectors import SGX_AT, VECTORS
from click.testing import CliRunner

from marblekeep.attestation.claims import TeeKind
from marblekeep.attestation.collateral import (
    CollateralCache,
    CollateralSource,
    DirectoryCollateralSource,
    PccsCollateralSource,
    load_collateral_file,
)
from marblekeep.attestation.dcap import Collateral, CollateralKey, verify_quote
from marblekeep.cli.main import main
from marblekeep.errors import CollateralError, ConfigError


def _vector(name: str) -> dict[str, str]:
    data: dict[str, str] = json.loads((VECTORS / f"{name}_collateral.json").read_bytes())
    return data


class FakePccs:
    """Intel PCS API v4 from memory: /sgx|tdx/certification/v4/{pckcrl,rootcacrl,tcb,qe/identity}."""

    def __init__(self) -> None:
        self.by_tee = {"sgx": _vector("sgx_quote"), "tdx": _vector("tdx_quote")}
        self.requests: list[str] = []
        self.fail_with: int | None = None
        self.headers_seen: list[dict[str, str]] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/{tee}/certification/v4/pckcrl", self.pckcrl)
        app.router.add_get("/{tee}/certification/v4/rootcacrl", self.rootcacrl)
        app.router.add_get("/{tee}/certification/v4/tcb", self.tcb)
        app.router.add_get("/{tee}/certification/v4/qe/identity", self.qe_identity)
        return app

    def _collateral_for_ca(self, ca: str) -> dict[str, str]:
        # the SGX vector is from a "processor" platform, the TDX one from a "platform" one
        return self.by_tee["sgx"] if ca == "processor" else self.by_tee["tdx"]

    async def pckcrl(self, request: web.Request) -> web.StreamResponse:
        self._note(request)
        if self.fail_with is not None:
            return web.Response(status=self.fail_with)
        data = self._collateral_for_ca(request.query["ca"])
        assert request.query["encoding"] == "der"
        return web.Response(
            body=bytes.fromhex(data["pck_crl"]),
            headers={"SGX-PCK-CRL-Issuer-Chain": urllib.parse.quote(data["pck_crl_issuer_chain"])},
        )

    async def rootcacrl(self, request: web.Request) -> web.StreamResponse:
        self._note(request)
        if self.fail_with is not None:
            return web.Response(status=self.fail_with)
        return web.Response(text=self.by_tee["sgx"]["root_ca_crl"])  # PCCS serves it as hex text

    async def tcb(self, request: web.Request) -> web.StreamResponse:
        self._note(request)
        if self.fail_with is not None:
            return web.Response(status=self.fail_with)
        data = self.by_tee[request.match_info["tee"]]
        if json.loads(data["tcb_info"])["fmspc"] != request.query["fmspc"]:
            return web.Response(status=404)
        body = '{"tcbInfo":' + data["tcb_info"] + ',"signature":"' + data["tcb_info_signature"] + '"}'
        return web.Response(
            text=body,
            content_type="application/json",
            headers={"TCB-Info-Issuer-Chain": urllib.parse.quote(data["tcb_info_issuer_chain"])},
        )

    async def qe_identity(self, request: web.Request) -> web.StreamResponse:
        self._note(request)
        if self.fail_with is not None:
            return web.Response(status=self.fail_with)
        data = self.by_tee[request.match_info["tee"]]
        body = (
            '{"enclaveIdentity": '
            + data["qe_identity"]
            + ', "signature": "'
            + data["qe_identity_signature"]
            + '"}'
        )
        return web.Response(
            text=body,
            content_type="application/json",
            headers={
                "SGX-Enclave-Identity-Issuer-Chain": urllib.parse.quote(data["qe_identity_issuer_chain"])
            },
        )

    def _note(self, request: web.Request) -> None:
        self.requests.append(request.path_qs)
        self.headers_seen.append(dict(request.headers))


@pytest.fixture
async def pccs() -> AsyncIterator[tuple[FakePccs, str]]:
    fake = FakePccs()
    runner = web.AppRunner(fake.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield fake, f"http://127.0.0.1:{port}"
    await runner.cleanup()


class Clock:
    def __init__(self, now: dt.datetime) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now


# --------------------------------------------------------------------------- PCCS


async def test_pccs_fetch_serves_verifiable_sgx_collateral(
    pccs: tuple[FakePccs, str], sgx_quote: bytes, sgx_collateral: Collateral
) -> None:
    fake, url = pccs
    collateral = await PccsCollateralSource(url + "/sgx/certification/v4/").fetch(sgx_quote)
    assert collateral.key == sgx_collateral.key
    assert (collateral.not_before, collateral.not_after) == (
        sgx_collateral.not_before,
        sgx_collateral.not_after,
    )
    claims = verify_quote(sgx_quote, collateral, SGX_AT)
    assert claims.tcb_status == "ConfigurationAndSWHardeningNeeded"
    # the signed documents are passed on byte for byte
    fetched = json.loads(collateral.raw_json)
    assert fetched["tcb_info"] == _vector("sgx_quote")["tcb_info"]
    assert fetched["qe_identity"] == _vector("sgx_quote")["qe_identity"]
    assert sorted(fake.requests) == sorted(
        [
            "/sgx/certification/v4/pckcrl?ca=processor&encoding=der",
            "/sgx/certification/v4/rootcacrl",
            "/sgx/certification/v4/tcb?fmspc=00A067110000",
            "/sgx/certification/v4/qe/identity?update=standard",
        ]
    )


async def test_pccs_fetch_tdx(pccs: tuple[FakePccs, str], tdx_quote: bytes) -> None:
    fake, url = pccs
    collateral = await PccsCollateralSource(url).fetch(tdx_quote)
    assert collateral.key == CollateralKey(TeeKind.TDX, "B0C06F000000", "platform")
    assert verify_quote(tdx_quote, collateral, SGX_AT).tcb_status == "UpToDate"
    assert "/tdx/certification/v4/tcb?fmspc=B0C06F000000" in fake.requests


async def test_pccs_http_errors_are_explained(pccs: tuple[FakePccs, str], sgx_quote: bytes) -> None:
    fake, url = pccs
    fake.fail_with = 404
    with pytest.raises(CollateralError) as info:
        await PccsCollateralSource(url).fetch(sgx_quote)
    assert "answered HTTP 404" in info.value.message and "no such collateral" in info.value.message
    fake.fail_with = 503
    with pytest.raises(CollateralError, match="answered HTTP 503"):
        await PccsCollateralSource(url).fetch(sgx_quote)


async def test_pccs_unreachable(sgx_quote: bytes, unused_tcp_port: int) -> None:
    source = PccsCollateralSource(f"http://127.0.0.1:{unused_tcp_port}", timeout=2)
    with pytest.raises(CollateralError) as info:
        await source.fetch(sgx_quote)
    assert "ConnectError" in info.value.message and "reachable" in info.value.message


async def test_pccs_api_key_is_sent_but_never_shown(pccs: tuple[FakePccs, str], sgx_quote: bytes) -> None:
    fake, url = pccs
    secret = "s3cr3t-api-key-0123456789"
    await PccsCollateralSource(url, api_key=secret).fetch(sgx_quote)
    assert all(h.get("Ocp-Apim-Subscription-Key") == secret for h in fake.headers_seen)
    fake.fail_with = 401
    with pytest.raises(CollateralError) as info:
        await PccsCollateralSource(url, api_key=secret).fetch(sgx_quote)
    assert secret not in info.value.message and secret not in info.value.diagnostics()
    assert "refused access" in info.value.message


def test_pccs_url_is_checked() -> None:
    with pytest.raises(ConfigError, match="must start with https://"):
        PccsCollateralSource("pccs.example:8081")
    assert PccsCollateralSource("https://pccs.example:8081/tdx/certification/v4").base_url == (
        "https://pccs.example:8081"
    )
    intel = PccsCollateralSource("https://api.trustedservices.intel.com")
    assert intel.root_ca_crl_url == "https://certificates.trustedservices.intel.com/IntelSGXRootCA.der"


# --------------------------------------------------------------------------- directory / bundle


def test_directory_source_indexes_by_content(tmp_path: Path, sgx_collateral: Collateral) -> None:
    for name in ("sgx_quote_collateral.json", "tdx_quote_collateral.json"):
        shutil.copy(VECTORS / name, tmp_path / f"renamed-{name}")
    source = DirectoryCollateralSource(tmp_path)
    assert [str(k) for k in source.available_keys()] == [
        "sgx/00A067110000/processor",
        "tdx/B0C06F000000/platform",
    ]
    assert source.find(sgx_collateral.key) == sgx_collateral


async def test_directory_source_fetch_and_missing_key(
    tmp_path: Path, sgx_quote: bytes, tdx_quote: bytes
) -> None:
    shutil.copy(VECTORS / "sgx_quote_collateral.json", tmp_path / "a.json")
    (tmp_path / "broken.json").write_text("{not json")
    source = DirectoryCollateralSource(tmp_path)
    assert (await source.fetch(sgx_quote)).key.tee is TeeKind.SGX
    with pytest.raises(CollateralError) as info:
        await source.fetch(tdx_quote)
    message = info.value.message
    assert message.startswith(f"no collateral for tdx/B0C06F000000/platform in {tmp_path}")
    assert "available: sgx/00A067110000/processor" in message and "broken.json" in message


def test_directory_source_picks_up_new_files(tmp_path: Path, tdx_collateral: Collateral) -> None:
    source = DirectoryCollateralSource(tmp_path)
    assert source.available_keys() == []
    shutil.copy(VECTORS / "tdx_quote_collateral.json", tmp_path / "new.json")
    assert source.find(tdx_collateral.key) == tdx_collateral


def test_bundle_file(tmp_path: Path, sgx_collateral: Collateral, tdx_collateral: Collateral) -> None:
    bundle = tmp_path / "bundle.json"
    bundle.write_text(json.dumps([_vector("sgx_quote"), _vector("tdx_quote")]))
    loaded = load_collateral_file(bundle)
    assert [c.key for c in loaded] == [sgx_collateral.key, tdx_collateral.key]
    assert DirectoryCollateralSource(bundle).find(tdx_collateral.key).not_after == tdx_collateral.not_after
    bundle.write_text(json.dumps([_vector("sgx_quote"), {"tcb_info": "x"}]))
    with pytest.raises(
        CollateralError, match=r"collateral bundle .*bundle.json \[1\]: collateral: pck_crl_issuer"
    ):
        load_collateral_file(bundle)


def test_missing_directory(tmp_path: Path, sgx_collateral: Collateral) -> None:
    with pytest.raises(CollateralError, match="does not exist"):
        DirectoryCollateralSource(tmp_path / "nope").find(sgx_collateral.key)


# --------------------------------------------------------------------------- cache


class MemorySource:
    """A CollateralSource that hands out a scripted sequence of collateral (or errors)."""

    def __init__(self, *answers: Collateral | CollateralError) -> None:
        self.answers = list(answers)
        self.calls = 0
        self.gate: asyncio.Event | None = None

    async def fetch(self, quote: bytes) -> Collateral:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        answer = self.answers[min(self.calls, len(self.answers)) - 1]
        if isinstance(answer, CollateralError):
            raise answer
        return answer


def _later(c: Collateral, days: int, issued_after: int = 1) -> Collateral:
    """The same collateral as if re-issued ``issued_after`` days later, valid ``days`` longer.

    (Only the window changes: enough for the cache's logic, which never looks inside.)
    """
    return dataclasses.replace(
        c,
        not_before=c.not_before + dt.timedelta(days=issued_after),
        not_after=c.not_after + dt.timedelta(days=days),
    )


async def test_cache_serves_from_memory_until_due(sgx_quote: bytes, sgx_collateral: Collateral) -> None:
    source = MemorySource(sgx_collateral)
    assert isinstance(source, CollateralSource)
    clock = Clock(SGX_AT)
    cache = CollateralCache(source, clock=clock, refresh_before=dt.timedelta(days=3))
    assert await cache.fetch(sgx_quote) is sgx_collateral
    clock.now += dt.timedelta(days=10)  # 2025-07-05: far from expiry
    assert await cache.fetch(sgx_quote) is sgx_collateral
    assert source.calls == 1
    (status,) = cache.status()
    assert status["key"] == "sgx/00A067110000/processor"
    assert status["fetched_at"] == "2025-06-25T00:00:00Z"
    assert status["not_after"] == "2025-07-19T10:01:18Z"
    assert status["age_seconds"] == 10 * 86400
    assert status["expired"] is False and status["last_error"] == ""


async def test_cache_refreshes_in_background_before_expiry(
    sgx_quote: bytes, sgx_collateral: Collateral
) -> None:
    newer = _later(sgx_collateral, 30)
    source = MemorySource(sgx_collateral, newer)
    clock = Clock(SGX_AT)
    cache = CollateralCache(source, clock=clock, refresh_before=dt.timedelta(days=3))
    await cache.fetch(sgx_quote)
    clock.now = sgx_collateral.not_after - dt.timedelta(days=1)  # inside the refresh window
    assert await cache.fetch(sgx_quote) is sgx_collateral  # answered at once with the valid one...
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert source.calls == 2  # ...while the refresh ran in the background
    assert await cache.fetch(sgx_quote) is newer
    assert cache.status()[0]["not_after"] == "2025-08-18T10:01:18Z"


async def test_refresh_due_runs_without_traffic(sgx_quote: bytes, sgx_collateral: Collateral) -> None:
    newer = _later(sgx_collateral, 30)
    source = MemorySource(sgx_collateral, newer)
    clock = Clock(SGX_AT)
    cache = CollateralCache(source, clock=clock)
    await cache.fetch(sgx_quote)
    assert await cache.refresh_due() == []  # nothing due yet
    clock.now = sgx_collateral.not_after - dt.timedelta(hours=1)
    assert await cache.refresh_due() == [sgx_collateral.key]
    assert source.calls == 2 and cache.status()[0]["not_after"] == "2025-08-18T10:01:18Z"


async def test_background_loop(sgx_quote: bytes, sgx_collateral: Collateral) -> None:
    source = MemorySource(_later(sgx_collateral, 30))
    clock = Clock(sgx_collateral.not_after - dt.timedelta(days=1))
    cache = CollateralCache(source, clock=clock)
    cache.put(sgx_collateral, sgx_quote)
    task = cache.start(interval=0.01)
    for _ in range(200):
        if source.calls:
            break
        await asyncio.sleep(0.01)
    await cache.aclose()
    assert task.done() and source.calls >= 1
    assert cache.status()[0]["not_after"] == "2025-08-18T10:01:18Z"


async def test_expired_collateral_is_never_used(sgx_quote: bytes, sgx_collateral: Collateral) -> None:
    source = MemorySource(sgx_collateral)  # the source has nothing newer
    clock = Clock(SGX_AT)
    cache = CollateralCache(source, clock=clock)
    await cache.fetch(sgx_quote)
    clock.now = sgx_collateral.not_after + dt.timedelta(seconds=1)
    with pytest.raises(CollateralError) as info:
        await cache.fetch(sgx_quote)
    assert info.value.message.startswith("collateral expired 2025-07-19T10:01:18Z")
    assert source.calls == 2  # it did try to fetch fresh collateral first
    assert cache.status()[0]["expired"] is True
    # never cached-and-expired on first contact either
    fresh_cache = CollateralCache(MemorySource(sgx_collateral), clock=clock)
    with pytest.raises(CollateralError, match="collateral expired"):
        await fresh_cache.fetch(sgx_quote)


async def test_not_yet_valid_refresh_does_not_replace_valid_collateral(
    sgx_quote: bytes, sgx_collateral: Collateral
) -> None:
    early = _later(sgx_collateral, 30, issued_after=40)  # "issued" after the clock: skew
    source = MemorySource(early)
    clock = Clock(sgx_collateral.not_after - dt.timedelta(days=1))
    cache = CollateralCache(source, clock=clock)
    cache.put(sgx_collateral, sgx_quote)
    await cache.refresh_due()
    assert await cache.fetch(sgx_quote) is sgx_collateral
    assert "kept the current one" in str(cache.status()[0]["last_error"])


async def test_expired_entry_replaced_by_fresh_fetch(sgx_quote: bytes, sgx_collateral: Collateral) -> None:
    newer = _later(sgx_collateral, 30)
    source = MemorySource(sgx_collateral, newer)
    clock = Clock(SGX_AT)
    cache = CollateralCache(source, clock=clock)
    await cache.fetch(sgx_quote)
    clock.now = sgx_collateral.not_after + dt.timedelta(days=1)
    assert await cache.fetch(sgx_quote) is newer


async def test_failed_refresh_keeps_valid_collateral(
    sgx_quote: bytes, sgx_collateral: Collateral, caplog: pytest.LogCaptureFixture
) -> None:
    source = MemorySource(sgx_collateral, CollateralError("collateral: PCCS down"))
    clock = Clock(SGX_AT)
    cache = CollateralCache(source, clock=clock, retry_interval=dt.timedelta(minutes=10))
    await cache.fetch(sgx_quote)
    clock.now = sgx_collateral.not_after - dt.timedelta(days=1)
    with caplog.at_level(logging.WARNING, logger="marblekeep.attestation.collateral"):
        assert await cache.refresh_due() == []
    assert await cache.fetch(sgx_quote) is sgx_collateral
    assert cache.status()[0]["last_error"] == "collateral: PCCS down"
    assert "PCCS down" in caplog.text
    assert await cache.refresh_due() == [] and source.calls == 2  # retry interval not yet over
    clock.now += dt.timedelta(minutes=11)
    await cache.refresh_due()
    assert source.calls == 3


async def test_concurrent_misses_fetch_once(sgx_quote: bytes, sgx_collateral: Collateral) -> None:
    source = MemorySource(sgx_collateral)
    source.gate = asyncio.Event()
    cache = CollateralCache(source, clock=Clock(SGX_AT))
    waiters = [asyncio.ensure_future(cache.fetch(sgx_quote)) for _ in range(5)]
    await asyncio.sleep(0.01)
    source.gate.set()
    results = await asyncio.gather(*waiters)
    assert all(r is sgx_collateral for r in results) and source.calls == 1


async def test_cache_over_pccs(pccs: tuple[FakePccs, str], sgx_quote: bytes, tdx_quote: bytes) -> None:
    fake, url = pccs
    clock = Clock(SGX_AT)
    cache = CollateralCache(PccsCollateralSource(url), clock=clock)
    for quote in (sgx_quote, tdx_quote, sgx_quote, tdx_quote):
        collateral = await cache.fetch(quote)
        verify_quote(quote, collateral, clock())
    assert len(fake.requests) == 8  # four requests per platform, once each
    assert [s["key"] for s in cache.status()] == ["sgx/00A067110000/processor", "tdx/B0C06F000000/platform"]


async def test_directory_source_through_cache(tmp_path: Path, sgx_quote: bytes) -> None:
    shutil.copy(VECTORS / "sgx_quote_collateral.json", tmp_path / "c.json")
    now: Callable[[], dt.datetime] = Clock(SGX_AT)
    cache = CollateralCache(DirectoryCollateralSource(tmp_path), clock=now)
    collateral = await cache.fetch(sgx_quote)
    assert verify_quote(sgx_quote, collateral, SGX_AT).tcb_status == "ConfigurationAndSWHardeningNeeded"
    assert os.path.exists(tmp_path / "c.json")


async def test_cli_fetch_collateral_for_air_gapped_use(
    pccs: tuple[FakePccs, str], tmp_path: Path, sgx_quote: bytes
) -> None:
    """`marblekeep attestation fetch-collateral` writes a file that the offline verifier accepts."""
    _fake, url = pccs
    runner = CliRunner()
    args = [
        "attestation",
        "fetch-collateral",
        str(VECTORS / "sgx_quote"),
        "--pccs-url",
        url,
        "-o",
        str(tmp_path),
    ]
    result = await asyncio.to_thread(runner.invoke, main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    written = tmp_path / "sgx-00A067110000-processor.json"
    assert f"wrote {written}: sgx/00A067110000/processor: valid 2025-06-19T10:56:11Z" in result.output
    (collateral,) = load_collateral_file(written)
    assert verify_quote(sgx_quote, collateral, SGX_AT).tcb_status == "ConfigurationAndSWHardeningNeeded"
    offline = await asyncio.to_thread(
        runner.invoke,
        main,
        [
            "attestation",
            "verify",
            str(VECTORS / "sgx_quote"),
            "--collateral",
            str(tmp_path),
            "--at",
            "2025-06-25T00:00:00Z",
        ],
    )
    assert offline.exit_code == 0, offline.output


async def test_cli_fetch_collateral_failure(pccs: tuple[FakePccs, str]) -> None:
    fake, url = pccs
    fake.fail_with = 404
    args = ["attestation", "fetch-collateral", str(VECTORS / "sgx_quote"), "--pccs-url", url]
    result = await asyncio.to_thread(
        CliRunner().invoke, main, args, env={"MARBLEKEEP_PCS_API_KEY": "k-9f8e7d"}
    )
    assert result.exit_code == 1
    assert "answered HTTP 404" in result.output and "k-9f8e7d" not in result.output
