"""Pure cryptography of the Coordinator: PKI (:mod:`.pki`), secret generation and derivation
(:mod:`.secretgen`) and root-key signatures (:mod:`.signing`). See docs/key-hierarchy.md."""
