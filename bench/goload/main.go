// Command goload is bench/activation.py's load generator for MarbleRun's gRPC Marble API
// (rpc.Marble/Activate), driven by google.golang.org/grpc as MarbleRun's premain (Go) drives it.
//
// It is written for marblekeep from the premain's observable behaviour
// (../shared/reference/marblerun-behaviour.md section 5.2, and tests/interop/premain, our own Go
// premain); it contains no MarbleRun code.
//
// Before measuring it makes a pool of Marble identities as MarbleRun v1.5.2's premain makes one at
// start (a P-256 key; a self-signed certificate, CN "MarbleRun Marble", SANs the -dns names plus
// 127.0.0.1 and ::1, key usage digital signature + key agreement, extended key usage server + client
// auth; a CSR with an empty subject and the same SANs), used round robin: the bench measures the
// Coordinator, not the Marble's key generation.
//
// One activation, as one premain start: a NEW grpc client connection (TLS with the identity's client
// certificate, InsecureSkipVerify as the premain without a CA file, ALPN h2 as grpc-go sets it, a full
// handshake: no session cache), one /rpc.Marble/Activate call with an empty quote (simulation), the
// CSR, the Marble type and a fresh v4 UUID, then the connection is closed. The answer must hold the
// Marble's certificate ("BEGIN CERTIFICATE") or the activation counts as an error. The request is
// encoded by hand with protowire and sent through a raw-bytes codec registered under grpc-go's "proto"
// name, so the wire (content-type application/grpc) is what a generated client sends.
//
// Protocol with the bench: 3 warm-up activations, then "ready" on stdout; on a line on stdin, -n
// goroutines activate for -seconds; then ONE JSON line on stdout:
//
//	{"latencies": [s, ...], "errors": ["...", ...], "elapsed": s, "cpu": s, "tls": "..."}
//
// cpu is this process's user + system CPU time (getrusage) during the measured part; tls names the
// negotiated TLS version and key exchange of one warm-up connection. Failures before the measurement go
// to stderr with exit status 1.
package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math"
	"math/big"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/google/uuid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/peer"
	"google.golang.org/protobuf/encoding/protowire"
)

const (
	activateMethod = "/rpc.Marble/Activate"
	callTimeout    = 60 * time.Second
	warmUps        = 3
	maxErrorText   = 200
	// maxErrors bounds the error messages kept; "error_count" counts them all.
	maxErrors = 10000
)

// rawCodec passes []byte through unchanged. Registered as "proto", it replaces grpc-go's protobuf
// codec for this process, so calls carry content-type application/grpc as a generated client's do.
type rawCodec struct{}

func (rawCodec) Marshal(v any) ([]byte, error) {
	b, ok := v.(*[]byte)
	if !ok {
		return nil, fmt.Errorf("rawCodec: cannot marshal %T", v)
	}
	return *b, nil
}

func (rawCodec) Unmarshal(data []byte, v any) error {
	b, ok := v.(*[]byte)
	if !ok {
		return fmt.Errorf("rawCodec: cannot unmarshal into %T", v)
	}
	*b = append((*b)[:0], data...)
	return nil
}

func (rawCodec) Name() string { return "proto" }

func init() { encoding.RegisterCodec(rawCodec{}) }

// identity is what one premain start makes: a key, its self-signed certificate, and a CSR.
type identity struct {
	cert tls.Certificate
	csr  []byte
}

func newIdentity(dnsNames []string) (*identity, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	var extraIPs []net.IP
	var names []string
	for _, name := range dnsNames {
		if ip := net.ParseIP(name); ip != nil {
			extraIPs = append(extraIPs, ip)
		} else {
			names = append(names, name)
		}
	}
	defaultIPs := []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		return nil, err
	}
	now := time.Now()
	template := &x509.Certificate{
		Subject:               pkix.Name{CommonName: "MarbleRun Marble"},
		SerialNumber:          serial,
		NotBefore:             now,
		NotAfter:              now.Add(math.MaxInt64),
		DNSNames:              names,
		IPAddresses:           append(append([]net.IP{}, extraIPs...), defaultIPs...),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyAgreement,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
	}
	certDER, err := x509.CreateCertificate(rand.Reader, template, template, &key.PublicKey, key)
	if err != nil {
		return nil, fmt.Errorf("creating the certificate: %w", err)
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		DNSNames:    names,
		IPAddresses: append(append([]net.IP{}, defaultIPs...), extraIPs...),
	}, key)
	if err != nil {
		return nil, fmt.Errorf("creating the CSR: %w", err)
	}
	return &identity{cert: tls.Certificate{Certificate: [][]byte{certDER}, PrivateKey: key}, csr: csr}, nil
}

// activationReq encodes rpc.ActivationReq: 1 Quote, 2 CSR (bytes), 3 MarbleType, 4 UUID (string);
// empty fields are omitted as proto3 does.
func activationReq(quote, csr []byte, marbleType, marbleUUID string) []byte {
	var b []byte
	if len(quote) > 0 {
		b = protowire.AppendTag(b, 1, protowire.BytesType)
		b = protowire.AppendBytes(b, quote)
	}
	b = protowire.AppendTag(b, 2, protowire.BytesType)
	b = protowire.AppendBytes(b, csr)
	b = protowire.AppendTag(b, 3, protowire.BytesType)
	b = protowire.AppendString(b, marbleType)
	b = protowire.AppendTag(b, 4, protowire.BytesType)
	b = protowire.AppendString(b, marbleUUID)
	return b
}

type loader struct {
	addr       string
	marbleType string
	pool       []*identity
	next       atomic.Uint64
}

// activate runs one premain-like activation; it returns a description of the negotiated TLS.
func (l *loader) activate() (string, error) {
	id := l.pool[(l.next.Add(1)-1)%uint64(len(l.pool))]
	creds := credentials.NewTLS(&tls.Config{
		Certificates:       []tls.Certificate{id.cert},
		InsecureSkipVerify: true, // as the premain without EDG_MARBLE_COORDINATOR_CA_FILE
	})
	conn, err := grpc.NewClient(l.addr, grpc.WithTransportCredentials(creds))
	if err != nil {
		return "", err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	req := activationReq(nil, id.csr, l.marbleType, uuid.NewString())
	var resp []byte
	var p peer.Peer
	if err := conn.Invoke(ctx, activateMethod, &req, &resp, grpc.Peer(&p)); err != nil {
		return "", err
	}
	if !bytes.Contains(resp, []byte("BEGIN CERTIFICATE")) {
		return "", fmt.Errorf("activation answer (%d bytes) holds no Marble certificate", len(resp))
	}
	desc := ""
	if info, ok := p.AuthInfo.(credentials.TLSInfo); ok {
		desc = fmt.Sprintf("%s, key exchange %s, ALPN %q", tls.VersionName(info.State.Version),
			keyExchange(&info.State), info.State.NegotiatedProtocol)
	}
	return desc, nil
}

type result struct {
	Latencies  []float64 `json:"latencies"`
	Errors     []string  `json:"errors"`
	ErrorCount int       `json:"error_count"`
	Elapsed    float64   `json:"elapsed"`
	CPU        float64   `json:"cpu"`
	TLS        string    `json:"tls"`
}

func cpuSeconds() float64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	tv := func(t syscall.Timeval) float64 { return float64(t.Sec) + float64(t.Usec)/1e6 }
	return tv(ru.Utime) + tv(ru.Stime)
}

func (l *loader) measure(n int, seconds float64) *result {
	var mu sync.Mutex
	res := &result{Latencies: []float64{}, Errors: []string{}}
	start := time.Now()
	cpu0 := cpuSeconds()
	deadline := start.Add(time.Duration(seconds * float64(time.Second)))
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var lat []float64
			var errs []string
			failed := 0
			for time.Now().Before(deadline) {
				t0 := time.Now()
				if _, err := l.activate(); err != nil {
					failed++
					if len(errs) < maxErrors {
						msg := err.Error()
						if len(msg) > maxErrorText {
							msg = msg[:maxErrorText]
						}
						errs = append(errs, msg)
					}
					continue
				}
				lat = append(lat, time.Since(t0).Seconds())
			}
			mu.Lock()
			res.Latencies = append(res.Latencies, lat...)
			res.ErrorCount += failed
			for _, e := range errs {
				if len(res.Errors) < maxErrors {
					res.Errors = append(res.Errors, e)
				}
			}
			mu.Unlock()
		}()
	}
	wg.Wait()
	res.Elapsed = time.Since(start).Seconds()
	res.CPU = cpuSeconds() - cpu0
	return res
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "goload: "+format+"\n", args...)
	os.Exit(1)
}

func main() {
	addr := flag.String("addr", "", "the Coordinator's Marble API, host:port (required)")
	n := flag.Int("n", 1, "concurrent Marbles (goroutines)")
	seconds := flag.Float64("seconds", 3, "duration of the measured part")
	marbleType := flag.String("type", "app", "the Marble type in the manifest")
	poolSize := flag.Int("pool", 32, "Marble identities made before measuring, used round robin")
	dns := flag.String("dns", "localhost", "comma-separated DNS names (as EDG_MARBLE_DNS_NAMES)")
	flag.Parse()
	if *addr == "" {
		fail("-addr is required (host:port of the Coordinator's Marble API)")
	}
	if *n < 1 || *poolSize < 1 || !(*seconds > 0) {
		fail("-n and -pool must be at least 1 and -seconds above 0")
	}

	l := &loader{addr: *addr, marbleType: *marbleType}
	for i := 0; i < *poolSize; i++ {
		id, err := newIdentity(strings.Split(*dns, ","))
		if err != nil {
			fail("making a Marble identity: %v", err)
		}
		l.pool = append(l.pool, id)
	}
	var tlsDesc string
	for i := 0; i < warmUps; i++ {
		desc, err := l.activate()
		if err != nil {
			fail("warm-up activation at %s: %v", *addr, err)
		}
		tlsDesc = desc
	}
	fmt.Println("ready")
	if _, err := bufio.NewReader(os.Stdin).ReadString('\n'); err != nil && !errors.Is(err, os.ErrClosed) {
		fail("waiting for the start line on stdin: %v", err)
	}
	res := l.measure(*n, *seconds)
	res.TLS = tlsDesc
	if err := json.NewEncoder(os.Stdout).Encode(res); err != nil {
		fail("writing the result: %v", err)
	}
}
