"""Attestation: verify TEE evidence, manage collateral, apply package policy, explain refusals.

Modules (import them directly; this package imports nothing so that ``claims`` stays cheap):

* :mod:`.claims` — :class:`TeeClaims`, what verified evidence says (shared type).
* :mod:`.evidence` — byte layout of DCAP quotes and Open Enclave's header (pure).
* :mod:`.dcap` — :class:`Collateral`, :func:`verify_quote`, :class:`QuoteVerifierPool` (dcap-qvl).
* :mod:`.collateral` — PCCS / directory sources and :class:`CollateralCache`.
* :mod:`.policy` — :func:`check_package`, :func:`check_report_data` (pure).
* :mod:`.explain` — :class:`AttestationRefused` and the explanation helpers (pure).
* :mod:`.signquote` — the sign-quote contract (pure).
* :mod:`.verifier_worker` — the pool's worker process.

See docs/attestation.md.
"""
