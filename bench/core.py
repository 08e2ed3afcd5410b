"""Throughput of the pure activation core against its crypto floor, on one core.

    .venv/bin/python bench/core.py [--seconds 1.5] [--rounds 5] [--profile]

(a) ``marblekeep.core.activation.activate`` for a Marble that receives the seal key, a shared and a
    per-Marble symmetric key, a shared cert-ecdsa secret and its own TLS credentials through six
    Files/Env templates (plus the predefined MARBLE_PREDEFINED_* variables), with SGX claims checked
    against its package policy (the Coordinator is not in simulation mode);
(b) the crypto floor: ``marblekeep.crypto.pki.leaf_floor`` (one P-384 key generation and one
    signature), the work activation cannot avoid.

Rounds alternate (a) and (b) so both see the same machine load; medians are reported, then the
ratio core/floor. Target: the core reaches at least 70% of the floor's rate. No assertion on time.
``--profile`` prints the top of a cProfile of the core instead.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import json
import os
import pstats
import statistics
import time
import uuid
from collections.abc import Callable

from marblekeep.attestation.claims import TeeClaims, TeeKind
from marblekeep.core.activation import ActivationInput, PreparedDeployment, activate
from marblekeep.core.deployment import new_deployment, set_manifest
from marblekeep.crypto.pki import leaf_floor
from marblekeep.manifest import load_manifest

NOW = dt.datetime(2026, 1, 15, 12, 0, tzinfo=dt.UTC)
SIGNER = "ab" * 32
TARGET = 0.70

MANIFEST = {
    "Packages": {"app": {"SignerID": SIGNER, "ProductID": 7, "SecurityVersion": 2, "Debug": False}},
    "Marbles": {
        "app": {
            "Package": "app",
            "Parameters": {
                "Files": {
                    "/data/seal.key": "{{ raw .MarbleRun.SealKey }}",
                    "/tls/marble.crt": "{{ pem .MarbleRun.MarbleCert.Cert }}",
                    "/tls/marble.key": "{{ pem .MarbleRun.MarbleCert.Private }}",
                    "/tls/service.pem": (
                        "{{ pem .Secrets.service_cert.Cert }}{{ pem .Secrets.service_cert.Private }}"
                    ),
                },
                "Env": {
                    "SHARED_KEY": "{{ hex .Secrets.shared_key }}",
                    "MARBLE_KEY": "{{ base64 .Secrets.marble_key }}",
                },
                "Argv": ["app", "--serve"],
            },
        }
    },
    "Secrets": {
        "shared_key": {"Type": "symmetric-key", "Size": 256, "Shared": True},
        "marble_key": {"Type": "symmetric-key", "Size": 256},
        "service_cert": {
            "Type": "cert-ecdsa",
            "Size": 256,
            "Shared": True,
            "Cert": {"Subject": {"CommonName": "service.internal"}, "DNSNames": ["service.internal"]},
        },
    },
}

CLAIMS = TeeClaims(
    kind=TeeKind.SGX,
    report_data=bytes(64),
    tcb_status="UpToDate",
    mrenclave="cd" * 32,
    mrsigner=SIGNER,
    isv_prod_id=7,
    isv_svn=3,
)


def prepare() -> tuple[PreparedDeployment, Callable[[], None], Callable[[], None]]:
    manifest = load_manifest(json.dumps(MANIFEST).encode())
    dep = set_manifest(new_deployment(["localhost"], NOW), manifest, NOW)
    prepared = PreparedDeployment(dep)
    inp = ActivationInput("app", uuid.UUID("3f2504e0-4f89-41d3-9a0c-0305e82c3301"), ("app.internal",), CLAIMS)
    result = activate(prepared, inp, NOW, simulation=False)
    assert len(result.files) + 2 == 6, "the bench Marble must render six templates"
    assert b"-----BEGIN CERTIFICATE-----" in result.files["/tls/marble.crt"]
    floor_key = dep.ca.marble_root.key

    def core() -> None:
        activate(prepared, inp, NOW, simulation=False, rng=os.urandom)

    def floor() -> None:
        leaf_floor(floor_key, NOW)

    return prepared, core, floor


def rate(fn: Callable[[], None], seconds: float) -> float:
    done = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(20):
            fn()
        done += 20
        now = time.perf_counter()
        if now >= deadline:
            return done / (now - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--seconds", type=float, default=1.5, help="duration of each measurement")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (medians are reported)")
    parser.add_argument("--profile", action="store_true", help="profile the core instead of timing it")
    args = parser.parse_args()

    _, core, floor = prepare()
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(2000):
            core()
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        return

    for fn in (core, floor):  # warm up
        rate(fn, 0.2)
    cores: list[float] = []
    floors: list[float] = []
    for i in range(args.rounds):
        # Alternate which goes first, so neither always runs on a warmer (or hotter) core.
        order = [(cores, core), (floors, floor)] if i % 2 == 0 else [(floors, floor), (cores, core)]
        for sink, fn in order:
            sink.append(rate(fn, args.seconds))
        print(f"round {i + 1}: core {cores[-1]:7.0f}/s   floor {floors[-1]:7.0f}/s", flush=True)
    core_rate = statistics.median(cores)
    floor_rate = statistics.median(floors)
    ratio = core_rate / floor_rate
    print()
    print("activation core (6 templates, SGX policy, seal/shared/per-Marble keys, shared cert, leaf):")
    print(f"  {core_rate:8.0f} activations/s  ({1e6 / core_rate:6.0f} us each), median of {args.rounds}")
    print("crypto floor (P-384 keygen + one signature, pki.leaf_floor):")
    print(f"  {floor_rate:8.0f} leaves/s       ({1e6 / floor_rate:6.0f} us each), median of {args.rounds}")
    verdict = "meets" if ratio >= TARGET else "MISSES"
    print(f"core / floor = {ratio:.0%} ({verdict} the target of {TARGET:.0%})")


if __name__ == "__main__":
    main()
