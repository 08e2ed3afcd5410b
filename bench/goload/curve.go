//go:build go1.25

package main

import "crypto/tls"

// keyExchange names the negotiated key exchange group (ConnectionState.CurveID: Go 1.25 and later).
func keyExchange(state *tls.ConnectionState) string { return state.CurveID.String() }
