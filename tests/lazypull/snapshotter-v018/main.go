// Command containerd-stargz-grpc-v018: the Stargz Snapshotter v0.18 as a
// containerd proxy snapshotter, built through the Go module proxy.
//
// The release's own cmd/containerd-stargz-grpc module has replace
// directives, so `go install ...@version` cannot build it; this module
// requires the library instead and serves service.NewStargzSnapshotterService
// (the constructor that command uses: fs + snapshot, CRI-label and
// default-label layer sources, external-TOC decompressor, resolver with plain
// HTTP for localhost) over gRPC on a unix socket.
//
// Flags: --root DIR, --address SOCK, --config FILE (containerd-stargz-grpc's
// config.toml format: fs keys at top level, [blob], [resolver], ...),
// --log-level LEVEL.  Logs are JSON lines on stderr.  On SIGINT or SIGTERM
// it stops serving and unmounts every layer it mounted.
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

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/contrib/snapshotservice"
	"github.com/containerd/log"
	"github.com/containerd/stargz-snapshotter/service"
	"github.com/pelletier/go-toml/v2"
	"github.com/sirupsen/logrus"
	"google.golang.org/grpc"
)

func main() {
	root := flag.String("root", "/var/lib/containerd-stargz-grpc", "root directory of the snapshotter")
	address := flag.String("address", "/run/containerd-stargz-grpc/containerd-stargz-grpc.sock", "unix socket to serve gRPC on")
	configPath := flag.String("config", "", "TOML configuration file (optional)")
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

	var cfg service.Config
	if configPath != "" {
		data, err := os.ReadFile(configPath)
		if err != nil {
			return err
		}
		if err := toml.Unmarshal(data, &cfg); err != nil {
			return fmt.Errorf("config %s: %w", configPath, err)
		}
	}
	sn, err := service.NewStargzSnapshotterService(ctx, root, &cfg)
	if err != nil {
		return err
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
