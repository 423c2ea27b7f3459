// Command referrers-registry serves go-containerregistry's registry
// (pkg/registry) with its OCI distribution 1.1 referrers API turned on
// (GET /v2/REPO/referrers/DIGEST), for the tests of estargz's records and
// v1 SOCI indexes against a registry that has the API: Debian's
// docker-registry 2.8 and Distribution 3 have none.
//
//	referrers-registry [-addr 127.0.0.1:0] [-blobs DIR] [-oci-subject]
//
// It listens on a loopback address only, prints the address it bound
// (HOST:PORT, port 0 picks a free one) as the one line of stdout once it
// accepts connections, logs every request to stderr, and stops gracefully
// on SIGTERM or SIGINT.  Manifests live in memory; blobs in DIR if given
// (the test images are larger than is worth holding twice), else in memory.
//
// What this registry does not do, as of go-containerregistry v0.22.1 (see
// pkg/registry/manifest.go): it sends no OCI-Subject header when a manifest
// with a subject is pushed (so clients keep the sha256-HEX tag index too,
// as the distribution spec says they must), it ignores the artifactType
// query filter (no OCI-Filters-Applied header), and it reports each
// referrer's artifactType as its config media type, even where the
// manifest has an artifactType of its own.
//
// -oci-subject adds the missing header: a manifest PUT that the registry
// accepts (201) and whose body has a subject is answered with
// "OCI-Subject: <subject digest>", as distribution-spec 1.1 has registries
// with the referrers API do, so that clients can skip the tag schema.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/google/go-containerregistry/pkg/registry"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:0", "loopback HOST:PORT to listen on (port 0: a free one)")
	blobs := flag.String("blobs", "", "directory for blobs (default: in memory)")
	ociSubject := flag.Bool("oci-subject", false, "answer OCI-Subject to pushes of manifests with a subject")
	flag.Parse()
	logger := log.New(os.Stderr, "referrers-registry: ", log.LstdFlags|log.Lmicroseconds)
	if flag.NArg() != 0 {
		logger.Printf("unexpected arguments %q", flag.Args())
		os.Exit(2)
	}
	host, _, err := net.SplitHostPort(*addr)
	if ip := net.ParseIP(host); err != nil || ip == nil || !ip.IsLoopback() {
		// A test registry with no auth must never be reachable from elsewhere.
		logger.Printf("-addr %q: want a loopback IP:PORT", *addr)
		os.Exit(2)
	}

	opts := []registry.Option{registry.WithReferrersSupport(true), registry.Logger(logger)}
	if *blobs != "" {
		if err := os.MkdirAll(*blobs, 0o755); err != nil {
			logger.Fatal(err)
		}
		opts = append(opts, registry.WithBlobHandler(registry.NewDiskBlobHandler(*blobs)))
	}
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		logger.Fatal(err)
	}
	handler := registry.New(opts...)
	if *ociSubject {
		handler = withOCISubject(handler)
	}
	srv := &http.Server{Handler: handler, ReadHeaderTimeout: 30 * time.Second}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	stopped := make(chan error, 1)
	go func() {
		<-ctx.Done()
		shutdown, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		stopped <- srv.Shutdown(shutdown)
	}()

	// Listening already: whoever reads this line can connect.
	fmt.Println(ln.Addr().String())
	if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
		logger.Fatal(err)
	}
	if err := <-stopped; err != nil {
		logger.Printf("shutdown: %v", err)
		os.Exit(1)
	}
	logger.Print("stopped")
}

// manifestLimit bounds the manifest bodies read to look for a subject (what
// containers/image accepts as a manifest).
const manifestLimit = 4 << 20

// withOCISubject wraps h so that an accepted manifest PUT whose body names
// a subject is answered with the OCI-Subject header.
func withOCISubject(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPut || !strings.Contains(r.URL.Path, "/manifests/") {
			h.ServeHTTP(w, r)
			return
		}
		body, err := io.ReadAll(io.LimitReader(r.Body, manifestLimit+1))
		if err != nil || len(body) > manifestLimit {
			http.Error(w, "manifest unreadable or too large", http.StatusRequestEntityTooLarge)
			return
		}
		r.Body = io.NopCloser(bytes.NewReader(body))
		var m struct {
			Subject *struct {
				Digest string `json:"digest"`
			} `json:"subject"`
		}
		if json.Unmarshal(body, &m) != nil || m.Subject == nil || m.Subject.Digest == "" {
			h.ServeHTTP(w, r)
			return
		}
		h.ServeHTTP(&subjectWriter{ResponseWriter: w, subject: m.Subject.Digest}, r)
	})
}

// subjectWriter adds OCI-Subject to a 201 answer.
type subjectWriter struct {
	http.ResponseWriter
	subject string
}

func (s *subjectWriter) WriteHeader(status int) {
	if status == http.StatusCreated {
		s.Header().Set("OCI-Subject", s.subject)
	}
	s.ResponseWriter.WriteHeader(status)
}
