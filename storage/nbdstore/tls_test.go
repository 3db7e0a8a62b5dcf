package nbdstore_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vdisk/vdisk"
	"github.com/vdisk/vdisk/driver"
	"github.com/vdisk/vdisk/nbd"
)

// writeCreds generates a CA and certificates for the server (127.0.0.1,
// localhost) and a client, in qemu's tls-creds-x509 directory layout.
func writeCreds(t testing.TB, dir string) {
	t.Helper()
	key := func() *ecdsa.PrivateKey {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	put := func(name, typ string, der []byte) {
		if err := os.WriteFile(filepath.Join(dir, name), pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	now := time.Now()
	caKey := key()
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "vdisk test CA"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	put(nbd.CredsCACert, "CERTIFICATE", caDER)
	for i, who := range []string{"server", "client"} {
		k := key()
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(int64(i + 2)), Subject: pkix.Name{CommonName: who},
			NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
			KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment}
		if who == "server" {
			tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
			tmpl.DNSNames = []string{"localhost"}
			tmpl.IPAddresses = []net.IP{net.IPv4(127, 0, 0, 1)}
		} else {
			tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &k.PublicKey, caKey)
		if err != nil {
			t.Fatal(err)
		}
		kd, err := x509.MarshalPKCS8PrivateKey(k)
		if err != nil {
			t.Fatal(err)
		}
		put(who+"-cert.pem", "CERTIFICATE", der)
		put(who+"-key.pem", "PRIVATE KEY", kd)
	}
}

// TestTLS reads and writes over nbds:// against qemu-nbd with x509
// credentials that verify the client too.
func TestTLS(t *testing.T) {
	dir := t.TempDir()
	creds := filepath.Join(dir, "creds")
	if err := os.Mkdir(creds, 0o700); err != nil {
		t.Fatal(err)
	}
	writeCreds(t, creds)
	file, want := sparseQcow2(t, dir, 4<<20, [][2]int64{{1 << 20, 256 << 10}})
	port := freePort(t)
	startServer(t, false, fmt.Sprintf("127.0.0.1:%d", port), "qemu-nbd", "-f", "qcow2", "-x", "x", "-b", "127.0.0.1", "-p", strconv.Itoa(port), "-t", "--shared=16",
		"--object", "tls-creds-x509,id=tls0,endpoint=server,verify-peer=on,dir="+creds, "--tls-creds", "tls0", file)
	url := fmt.Sprintf("nbds://127.0.0.1:%d/x", port)
	d := openRaw(t, url, false, &vdisk.OpenOptions{StorageOptions: map[string]string{"tls-creds": creds}})
	if got := readAll(t, d); firstDiff(got, want) >= 0 {
		t.Fatalf("differs at %d", firstDiff(got, want))
	}
	if _, err := d.WriteAt([]byte("over TLS"), 3<<20+5); err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 8)
	if _, err := d.ReadAt(b, 3<<20+5); err != nil || string(b) != "over TLS" {
		t.Fatalf("read back %q %v", b, err)
	}
	// The name the certificate carries is checked.
	_, err := vdisk.Open(context.Background(), url, &vdisk.OpenOptions{Format: "raw", ReadOnly: true,
		StorageOptions: map[string]string{"tls-creds": creds, "tls-hostname": "elsewhere.example"}})
	if err == nil || !strings.Contains(err.Error(), "elsewhere.example") {
		t.Fatalf("wrong hostname: %v", err)
	}
	// Without TLS the server refuses, and the error says why.
	_, err = vdisk.Open(context.Background(), strings.Replace(url, "nbds:", "nbd:", 1), &vdisk.OpenOptions{Format: "raw", ReadOnly: true})
	if err == nil || !strings.Contains(err.Error(), "requires TLS") {
		t.Fatalf("plain connection to a TLS server: %v", err)
	}
	// The export list over TLS.
	open, _ := driver.LookupScheme("nbds")
	st, _, err := open(context.Background(), url, &driver.SchemeEnv{Options: map[string]string{"tls-creds": creds}})
	if err != nil {
		t.Fatal(err)
	}
	l, err := st.(driver.Lister).ListExports(context.Background(), url)
	if err != nil || len(l) != 1 || l[0].Name != "x" {
		t.Fatalf("list over TLS: %+v %v", l, err)
	}
	// PSK credentials are refused with the reason.
	psk := filepath.Join(dir, "psk")
	os.Mkdir(psk, 0o700)
	os.WriteFile(filepath.Join(psk, "keys.psk"), []byte("user:0123\n"), 0o600)
	_, err = vdisk.Open(context.Background(), url, &vdisk.OpenOptions{Format: "raw", StorageOptions: map[string]string{"tls-creds": psk}})
	if !errors.Is(err, driver.ErrUnsupported) || !strings.Contains(err.Error(), "PSK") {
		t.Fatalf("PSK credentials: %v", err)
	}
}
