// Command premain is a test Marble for marblekeep's interop tests: a MarbleRun-style premain that
// activates over MarbleRun's gRPC Marble API (rpc.Marble/Activate) the way MarbleRun v1.5.2's
// premain.PreMainMock does, then prints what it was given as one JSON object on stdout.
//
// It exists because MarbleRun's own module (github.com/edgelesssys/marblerun) is not served by the Go
// module proxy (HTTP 403 "This module version is not available"), so premain.PreMainMock cannot be
// imported in CI. This program is written for marblekeep from the observable behaviour documented in
// MarbleRun's reference (../shared/reference/marblerun-behaviour.md, sections 5.1 and 5.2); it contains
// no MarbleRun code. See tests/interop/README.md.
//
// Steps, in MarbleRun's order (section 5.2):
//  1. configuration from EDG_MARBLE_COORDINATOR_ADDR (default localhost:2001), EDG_MARBLE_TYPE
//     (required), EDG_MARBLE_DNS_NAMES (default localhost) and EDG_MARBLE_UUID_FILE
//     (default <EDG_CWD or cwd>/uuid);
//  2. a fresh self-signed TLS certificate (P-256 key as in v1.5.2, CN "MarbleRun Marble");
//  3. the UUID loaded from the UUID file, or a new v4 UUID written there with mode 0600;
//  4. a CSR with the same key and an empty subject;
//  5. the quote: PreMainMock's issuer always fails, so the quote is empty (simulation);
//  6. one Activate call over TLS with the self-signed client certificate, InsecureSkipVerify, no retry;
//  7. the TTLS configuration, if any, must not be empty;
//  8. Files written (parent directories 0700, files 0600), Env set, Argv replaces os.Args
//     (["./marble"] when empty).
//
// On success it prints {"uuid", "marble_type", "argv", "env", "files"} and exits 0. On any failure it
// prints "premain: <error>" on stderr (for a refusal, the gRPC status code and the Coordinator's
// message) and exits 1.
package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"errors"
	"fmt"
	"log"
	"math"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/google/uuid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/types/descriptorpb"
	"google.golang.org/protobuf/types/dynamicpb"
)

const activateMethod = "/rpc.Marble/Activate"

// report is what the program prints on stdout after a successful activation.
type report struct {
	UUID       string            `json:"uuid"`
	MarbleType string            `json:"marble_type"`
	Argv       []string          `json:"argv"`
	Env        map[string]string `json:"env"`
	Files      []string          `json:"files"`
}

func main() {
	log.SetFlags(0)
	log.SetPrefix("[PreMain] ")
	out, err := preMain()
	if err != nil {
		fmt.Fprintf(os.Stderr, "premain: %v\n", err)
		os.Exit(1)
	}
	enc := json.NewEncoder(os.Stdout)
	if err := enc.Encode(out); err != nil {
		fmt.Fprintf(os.Stderr, "premain: writing the report: %v\n", err)
		os.Exit(1)
	}
}

func getenv(name, fallback string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return fallback
}

func preMain() (*report, error) {
	// 1. configuration
	coordAddr := getenv("EDG_MARBLE_COORDINATOR_ADDR", "localhost:2001")
	marbleType := os.Getenv("EDG_MARBLE_TYPE")
	if marbleType == "" {
		return nil, errors.New("environment variable not set: EDG_MARBLE_TYPE")
	}
	altNames := strings.Split(getenv("EDG_MARBLE_DNS_NAMES", "localhost"), ",")
	cwd := os.Getenv("EDG_CWD")
	if cwd == "" {
		var err error
		if cwd, err = os.Getwd(); err != nil {
			return nil, err
		}
	}
	uuidFile := getenv("EDG_MARBLE_UUID_FILE", filepath.Join(cwd, "uuid"))

	// 2. self-signed TLS certificate
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	extraIPs, dnsNames := splitAltNames(altNames)
	defaultIPs := []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback}
	certDER, err := selfSignedCert(key, dnsNames, append(append([]net.IP{}, extraIPs...), defaultIPs...))
	if err != nil {
		return nil, fmt.Errorf("creating the TLS certificate: %w", err)
	}

	// 3. UUID
	marbleUUID, err := loadOrCreateUUID(uuidFile)
	if err != nil {
		return nil, err
	}
	log.Println("UUID:", marbleUUID)

	// 4. CSR: empty subject; SAN = default IPs, then extra IPs, then DNS names
	csrDER, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		DNSNames:    dnsNames,
		IPAddresses: append(append([]net.IP{}, defaultIPs...), extraIPs...),
	}, key)
	if err != nil {
		return nil, fmt.Errorf("creating the CSR: %w", err)
	}

	// 5. quote: PreMainMock has no quote issuer that works, so it proceeds in simulation mode
	log.Println("no quote issuer (as PreMainMock): sending an empty quote, which only a simulation Coordinator accepts")
	quote := []byte{}

	// 6. one Activate call
	tlsConfig := &tls.Config{
		Certificates:       []tls.Certificate{{Certificate: [][]byte{certDER}, PrivateKey: key}},
		InsecureSkipVerify: true, // a Marble does not authenticate the Coordinator (section 5.1)
	}
	log.Println("activating marble of type", marbleType)
	params, err := activate(coordAddr, credentials.NewTLS(tlsConfig), quote, csrDER, marbleType, marbleUUID.String())
	if err != nil {
		return nil, err
	}

	// 7. TTLS
	if err := checkTTLS(params.env); err != nil {
		return nil, err
	}

	// 8. apply the parameters
	files := make([]string, 0, len(params.files))
	for path, data := range params.files {
		if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
			return nil, err
		}
		if err := os.WriteFile(path, data, 0o600); err != nil {
			return nil, err
		}
		files = append(files, path)
	}
	sort.Strings(files)
	env := make(map[string]string, len(params.env))
	for name, value := range params.env {
		if err := os.Setenv(name, string(value)); err != nil {
			return nil, err
		}
		env[name] = os.Getenv(name) // read back: what the application would see
	}
	if len(params.argv) > 0 {
		os.Args = params.argv
	} else {
		os.Args = []string{"./marble"}
	}
	log.Println("done with PreMain")
	return &report{UUID: marbleUUID.String(), MarbleType: marbleType, Argv: os.Args, Env: env, Files: files}, nil
}

func splitAltNames(names []string) (ips []net.IP, dns []string) {
	for _, name := range names {
		if ip := net.ParseIP(name); ip != nil {
			ips = append(ips, ip)
		} else {
			dns = append(dns, name)
		}
	}
	return ips, dns
}

func selfSignedCert(key *ecdsa.PrivateKey, dnsNames []string, ips []net.IP) ([]byte, error) {
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
		DNSNames:              dnsNames,
		IPAddresses:           ips,
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyAgreement,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
	}
	return x509.CreateCertificate(rand.Reader, template, template, &key.PublicKey, key)
}

func loadOrCreateUUID(path string) (uuid.UUID, error) {
	data, err := os.ReadFile(path)
	if err == nil {
		var id uuid.UUID
		if err := id.UnmarshalText(data); err != nil {
			return uuid.UUID{}, fmt.Errorf("failed to unmarshal UUID: %v", err)
		}
		return id, nil
	}
	if !errors.Is(err, os.ErrNotExist) {
		return uuid.UUID{}, err
	}
	id := uuid.New()
	text, _ := id.MarshalText()
	if err := os.WriteFile(path, text, 0o600); err != nil {
		return uuid.UUID{}, fmt.Errorf("failed to store uuid to file: %v", err)
	}
	return id, nil
}

func checkTTLS(env map[string][]byte) error {
	raw, ok := env["MARBLE_TTLS_CONFIG"]
	if !ok {
		return nil
	}
	var conf map[string]map[string]map[string]map[string]any
	if err := json.Unmarshal(raw, &conf); err != nil {
		return fmt.Errorf("unmarshaling TTLS config: %w", err)
	}
	if len(conf["tls"]["Incoming"]) == 0 && len(conf["tls"]["Outgoing"]) == 0 {
		return errors.New("TTLS config is empty")
	}
	return nil
}

// ---------------------------------------------------------------------------- gRPC and protobuf

type parameters struct {
	files map[string][]byte
	env   map[string][]byte
	argv  []string
}

func activate(
	addr string, creds credentials.TransportCredentials, quote, csr []byte, marbleType, marbleUUID string,
) (*parameters, error) {
	msgs, err := messages()
	if err != nil {
		return nil, err
	}
	req := dynamicpb.NewMessage(msgs.ByName("ActivationReq"))
	fields := req.Descriptor().Fields()
	req.Set(fields.ByName("Quote"), protoreflect.ValueOfBytes(quote))
	req.Set(fields.ByName("CSR"), protoreflect.ValueOfBytes(csr))
	req.Set(fields.ByName("MarbleType"), protoreflect.ValueOfString(marbleType))
	req.Set(fields.ByName("UUID"), protoreflect.ValueOfString(marbleUUID))
	resp := dynamicpb.NewMessage(msgs.ByName("ActivationResp"))

	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(creds))
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	if err := conn.Invoke(context.Background(), activateMethod, proto.Message(req), proto.Message(resp)); err != nil {
		return nil, err
	}

	out := &parameters{files: map[string][]byte{}, env: map[string][]byte{}}
	params := resp.Get(resp.Descriptor().Fields().ByName("Parameters")).Message()
	pf := params.Descriptor().Fields()
	params.Get(pf.ByName("Files")).Map().Range(func(k protoreflect.MapKey, v protoreflect.Value) bool {
		out.files[k.String()] = v.Bytes()
		return true
	})
	params.Get(pf.ByName("Env")).Map().Range(func(k protoreflect.MapKey, v protoreflect.Value) bool {
		out.env[k.String()] = v.Bytes()
		return true
	})
	argv := params.Get(pf.ByName("Argv")).List()
	for i := 0; i < argv.Len(); i++ {
		out.argv = append(out.argv, argv.Get(i).String())
	}
	return out, nil
}

// messages describes MarbleRun's Marble API messages (package rpc, section 5.1) for dynamicpb.
func messages() (protoreflect.MessageDescriptors, error) {
	s := proto.String
	i := proto.Int32
	opt := descriptorpb.FieldDescriptorProto_LABEL_OPTIONAL.Enum()
	rep := descriptorpb.FieldDescriptorProto_LABEL_REPEATED.Enum()
	typBytes := descriptorpb.FieldDescriptorProto_TYPE_BYTES.Enum()
	typString := descriptorpb.FieldDescriptorProto_TYPE_STRING.Enum()
	typMsg := descriptorpb.FieldDescriptorProto_TYPE_MESSAGE.Enum()
	field := func(name string, num int32, label *descriptorpb.FieldDescriptorProto_Label,
		typ *descriptorpb.FieldDescriptorProto_Type, typeName string,
	) *descriptorpb.FieldDescriptorProto {
		f := &descriptorpb.FieldDescriptorProto{Name: s(name), Number: i(num), Label: label, Type: typ, JsonName: s(name)}
		if typeName != "" {
			f.TypeName = s(typeName)
		}
		return f
	}
	mapEntry := func(name string) *descriptorpb.DescriptorProto {
		return &descriptorpb.DescriptorProto{
			Name: s(name),
			Field: []*descriptorpb.FieldDescriptorProto{
				field("key", 1, opt, typString, ""),
				field("value", 2, opt, typBytes, ""),
			},
			Options: &descriptorpb.MessageOptions{MapEntry: proto.Bool(true)},
		}
	}
	file := &descriptorpb.FileDescriptorProto{
		Name:    s("marblekeep/interop/marble_api.proto"),
		Package: s("rpc"),
		Syntax:  s("proto3"),
		MessageType: []*descriptorpb.DescriptorProto{
			{
				Name: s("ActivationReq"),
				Field: []*descriptorpb.FieldDescriptorProto{
					field("Quote", 1, opt, typBytes, ""),
					field("CSR", 2, opt, typBytes, ""),
					field("MarbleType", 3, opt, typString, ""),
					field("UUID", 4, opt, typString, ""),
				},
			},
			{
				Name:  s("ActivationResp"),
				Field: []*descriptorpb.FieldDescriptorProto{field("Parameters", 1, opt, typMsg, ".rpc.Parameters")},
			},
			{
				Name: s("Parameters"),
				Field: []*descriptorpb.FieldDescriptorProto{
					field("Files", 1, rep, typMsg, ".rpc.Parameters.FilesEntry"),
					field("Env", 2, rep, typMsg, ".rpc.Parameters.EnvEntry"),
					field("Argv", 3, rep, typString, ""),
				},
				NestedType: []*descriptorpb.DescriptorProto{mapEntry("FilesEntry"), mapEntry("EnvEntry")},
			},
		},
	}
	fd, err := protodesc.NewFile(file, protoregistry.GlobalFiles)
	if err != nil {
		return nil, fmt.Errorf("describing the Marble API messages: %w", err)
	}
	return fd.Messages(), nil
}
