//go:build !go1.25

package main

import "crypto/tls"

// keyExchange: Go before 1.25 does not report the negotiated group.
func keyExchange(*tls.ConnectionState) string { return "unknown (Go < 1.25)" }
