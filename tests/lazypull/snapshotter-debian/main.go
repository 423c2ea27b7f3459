// Command containerd-stargz-grpc-debian: the Stargz Snapshotter as a
// containerd proxy snapshotter, built from Debian bookworm's packaged sources
// (golang-github-containerd-stargz-snapshotter-dev 0.12) in GOPATH mode.
//
// Debian packages the library but not the daemon, and its service/ package
// imports k8s.io/cri-api, which Debian lacks, so this wires the same pieces
// service.NewStargzSnapshotterService does (fs + snapshot, the default-label
// layer source, the overlayfs opaque-xattr check) and serves the result over
// gRPC on a unix socket like cmd/containerd-stargz-grpc.
//
// Flags: --root DIR, --address SOCK, --config FILE (TOML with the keys of
// fs/config.Config at top level, as in containerd-stargz-grpc's
// config.toml), --log-level LEVEL.  Logs are JSON lines on stderr.  On SIGINT
// or SIGTERM it stops serving and unmounts every layer it mounted.
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/BurntSushi/toml"
	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/contrib/snapshotservice"
	"github.com/containerd/containerd/log"
	"github.com/containerd/containerd/reference"
	"github.com/containerd/containerd/remotes/docker"
	"github.com/containerd/containerd/snapshots/overlay/overlayutils"
	stargzfs "github.com/containerd/stargz-snapshotter/fs"
	fsconfig "github.com/containerd/stargz-snapshotter/fs/config"
	"github.com/containerd/stargz-snapshotter/fs/layer"
	"github.com/containerd/stargz-snapshotter/fs/source"
	snbase "github.com/containerd/stargz-snapshotter/snapshot"
	rhttp "github.com/hashicorp/go-retryablehttp"
	"github.com/sirupsen/logrus"
	"google.golang.org/grpc"
)

func main() {
	root := flag.String("root", "/var/lib/containerd-stargz-grpc", "root directory of the snapshotter")
	address := flag.String("address", "/run/containerd-stargz-grpc/containerd-stargz-grpc.sock", "unix socket to serve gRPC on")
	configPath := flag.String("config", "", "TOML file with the filesystem configuration (optional)")
	logLevel := flag.String("log-level", "info", "trace, debug, info, warn or error")
	flag.Parse()
	if err := run(*root, *address, *configPath, *logLevel); err != nil {
		fmt.Fprintf(os.Stderr, "containerd-stargz-grpc: %v\n", err)
		os.Exit(1)
	}
}

func run(root, address, configPath, logLevel string) error {
	lvl, err := logrus.ParseLevel(logLevel)
	if err != nil {
		return err
	}
	logrus.SetLevel(lvl)
	logrus.SetFormatter(&logrus.JSONFormatter{TimestampFormat: log.RFC3339NanoFixed})
	ctx := log.WithLogger(context.Background(), log.L)

	var cfg fsconfig.Config
	if configPath != "" {
		if _, err := toml.DecodeFile(configPath, &cfg); err != nil {
			return fmt.Errorf("config %s: %w", configPath, err)
		}
	}

	snRoot := filepath.Join(root, "snapshotter")
	if err := os.MkdirAll(snRoot, 0o700); err != nil {
		return err
	}
	// As service.NewStargzSnapshotterService: overlayfs needs user.* opaque
	// xattrs where trusted.* is unavailable (e.g. in a user namespace).
	opq := layer.OverlayOpaqueTrusted
	if userxattr, err := overlayutils.NeedsUserXAttr(snRoot); err != nil {
		log.G(ctx).WithError(err).Warn("cannot detect whether userxattr is needed")
	} else if userxattr {
		opq = layer.OverlayOpaqueUser
	}
	fs, err := stargzfs.NewFilesystem(filepath.Join(root, "stargz"), cfg,
		stargzfs.WithGetSources(source.FromDefaultLabels(registryHosts)),
		stargzfs.WithOverlayOpaqueType(opq))
	if err != nil {
		return fmt.Errorf("configure filesystem: %w", err)
	}
	sn, err := snbase.NewSnapshotter(ctx, snRoot, fs, snbase.AsynchronousRemove)
	if err != nil {
		return fmt.Errorf("configure snapshotter: %w", err)
	}

	if err := os.MkdirAll(filepath.Dir(address), 0o700); err != nil {
		return err
	}
	if err := os.RemoveAll(address); err != nil {
		return err
	}
	l, err := net.Listen("unix", address)
	if err != nil {
		return err
	}
	rpc := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(rpc, snapshotservice.FromSnapshotter(sn))
	served := make(chan error, 1)
	go func() { served <- rpc.Serve(l) }()
	log.G(ctx).WithField("address", address).Info("serving")

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	select {
	case s := <-sig:
		log.G(ctx).WithField("signal", s.String()).Info("stopping")
	case err = <-served:
	}
	rpc.Stop()
	// Close unmounts every layer (committed ones too) and closes the metadata.
	if cerr := sn.Close(); cerr != nil && err == nil {
		err = cerr
	}
	log.G(ctx).Info("exiting")
	return err
}

// registryHosts is service/resolver.RegistryHostsFromConfig (0.12) with an
// empty [resolver] config and no credentials: a retrying HTTP client with a
// 30 s request timeout; HTTPS, except plain HTTP for localhost and loopback
// addresses (the tests' registry).  Copied because that package's cri.go
// imports k8s.io/cri-api.
func registryHosts(ref reference.Spec) ([]docker.RegistryHost, error) {
	host := ref.Hostname()
	retrying := rhttp.NewClient()
	retrying.Logger = nil // the daemon's own choice: no log line per request
	client := retrying.StandardClient()
	client.Timeout = 30 * time.Second
	h := docker.RegistryHost{
		Client:       client,
		Authorizer:   docker.NewDockerAuthorizer(docker.WithAuthClient(client)),
		Host:         host,
		Scheme:       "https",
		Path:         "/v2",
		Capabilities: docker.HostCapabilityPull | docker.HostCapabilityResolve,
	}
	if local, _ := docker.MatchLocalhost(host); local {
		h.Scheme = "http"
	}
	if host == "docker.io" {
		h.Host = "registry-1.docker.io"
	}
	return []docker.RegistryHost{h}, nil
}
