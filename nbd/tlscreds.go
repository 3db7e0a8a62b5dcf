package nbd

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// X.509 credentials as qemu and libnbd (GnuTLS) keep them: a directory
// with the CA certificate(s) and the endpoint's certificate and key, all
// PEM (qemu's tls-creds-x509 object with dir=, nbdinfo's
// tls-certificates=).
const (
	CredsCACert     = "ca-cert.pem"
	CredsServerCert = "server-cert.pem"
	CredsServerKey  = "server-key.pem"
	CredsClientCert = "client-cert.pem"
	CredsClientKey  = "client-key.pem"
)

// ServerTLSConfig builds a Server's TLSConfig from PEM files: the server's
// certificate (chain) and key, and, when caFile is not empty, the CA
// certificates that client certificates must chain to. With a CA every
// client must present a valid certificate (qemu's verify-peer=on), and the
// Server then requires TLS of every client.
func ServerTLSConfig(certFile, keyFile, caFile string) (*tls.Config, error) {
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("loading the TLS certificate: %w", err)
	}
	cfg := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	if caFile != "" {
		pool, err := loadCAs(caFile)
		if err != nil {
			return nil, err
		}
		cfg.ClientCAs = pool
		cfg.ClientAuth = tls.RequireAndVerifyClientCert
	}
	return cfg, nil
}

// ServerTLSCreds builds a Server's TLSConfig from a qemu credentials
// directory: server-cert.pem, server-key.pem and ca-cert.pem. As with
// qemu's default verify-peer=on, clients must present a certificate signed
// by a CA of ca-cert.pem unless verifyPeer is false.
func ServerTLSCreds(dir string, verifyPeer bool) (*tls.Config, error) {
	ca := filepath.Join(dir, CredsCACert)
	if !verifyPeer {
		ca = ""
	}
	return ServerTLSConfig(filepath.Join(dir, CredsServerCert), filepath.Join(dir, CredsServerKey), ca)
}

// ClientTLSConfig builds a Client's TLSConfig from PEM files: caFile holds
// the CAs the server's certificate must chain to (empty: the system's),
// serverName the name it must carry, and certFile/keyFile (both or
// neither) the client's certificate for servers that authenticate
// clients.
func ClientTLSConfig(caFile, certFile, keyFile, serverName string) (*tls.Config, error) {
	cfg := &tls.Config{ServerName: serverName, MinVersion: tls.VersionTLS12}
	if caFile != "" {
		pool, err := loadCAs(caFile)
		if err != nil {
			return nil, err
		}
		cfg.RootCAs = pool
	}
	if (certFile == "") != (keyFile == "") {
		return nil, errors.New("a client certificate needs its key and the other way round")
	}
	if certFile != "" {
		cert, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return nil, fmt.Errorf("loading the TLS client certificate: %w", err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	return cfg, nil
}

// ClientTLSCreds builds a Client's TLSConfig from a qemu credentials
// directory: ca-cert.pem, and client-cert.pem with client-key.pem when
// they exist.
func ClientTLSCreds(dir, serverName string) (*tls.Config, error) {
	cert, key := filepath.Join(dir, CredsClientCert), filepath.Join(dir, CredsClientKey)
	if _, err := os.Stat(cert); errors.Is(err, fs.ErrNotExist) {
		cert, key = "", ""
	}
	return ClientTLSConfig(filepath.Join(dir, CredsCACert), cert, key, serverName)
}

func loadCAs(file string) (*x509.CertPool, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("loading the TLS CA certificates: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(b) {
		return nil, fmt.Errorf("%s: no PEM certificate found", file)
	}
	return pool, nil
}
