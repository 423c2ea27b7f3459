// soci-rpull: pull an image into containerd, unpacking it with a remote
// snapshotter (the SOCI snapshotter), the way `soci image rpull` did before
// soci-snapshotter removed that command (v0.10) in favour of nerdctl and CRI.
//
// A remote snapshotter only sees the labels the client puts on each layer's
// Prepare call.  containerd's CRI plugin and nerdctl add the image reference,
// the manifest digest and the layer digests (containerd's
// pkg/snapshotters.AppendInfoHandlerWrapper, "containerd.io/snapshot/cri.*");
// soci's own fs/source.AppendDefaultLabelsHandlerWrapper adds the layer sizes
// and, with --soci-index-digest, the SOCI index to use.  Without that flag the
// snapshotter looks the index up itself: the manifest's
// com.amazon.soci.index-digest annotation (v2), or the referrers (v1, when
// enabled in its config).  ctr and Debian's ctr-remote set neither label set.
//
//	soci-rpull --address SOCK [--namespace NS] [--snapshotter soci]
//	           [--plain-http] [--soci-index-digest sha256:...]
//	           [--platform linux/amd64] REF
//
// Prints the pulled image's target digest on stdout.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"

	"github.com/awslabs/soci-snapshotter/fs/source"
	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/snapshotters"
)

func main() {
	address := flag.String("address", "", "containerd socket")
	namespace := flag.String("namespace", "default", "containerd namespace")
	snapshotter := flag.String("snapshotter", "soci", "snapshotter to unpack with")
	plainHTTP := flag.Bool("plain-http", false, "talk to every registry over plain HTTP")
	indexDigest := flag.String("soci-index-digest", "", "SOCI index manifest digest (default: let the snapshotter look it up)")
	platform := flag.String("platform", "", "platform to pull (default: the host's)")
	flag.Parse()
	if *address == "" || flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: soci-rpull --address SOCK [flags] REF")
		os.Exit(2)
	}
	if err := pull(*address, *namespace, *snapshotter, *plainHTTP, *indexDigest, *platform, flag.Arg(0)); err != nil {
		fmt.Fprintf(os.Stderr, "soci-rpull: %v\n", err)
		os.Exit(1)
	}
}

func pull(address, namespace, snapshotter string, plainHTTP bool, indexDigest, platform, ref string) error {
	client, err := containerd.New(address, containerd.WithDefaultNamespace(namespace))
	if err != nil {
		return err
	}
	defer client.Close()
	ctx := namespaces.WithNamespace(context.Background(), namespace)

	var hostOpts []docker.RegistryOpt
	if plainHTTP {
		hostOpts = append(hostOpts, docker.WithPlainHTTP(docker.MatchAllHosts))
	}
	resolver := docker.NewResolver(docker.ResolverOptions{
		Hosts: docker.ConfigureDefaultRegistries(hostOpts...),
	})
	opts := []containerd.RemoteOpt{
		containerd.WithResolver(resolver),
		containerd.WithPullUnpack,
		containerd.WithPullSnapshotter(snapshotter),
		containerd.WithImageHandlerWrapper(source.AppendDefaultLabelsHandlerWrapper(
			indexDigest, snapshotters.AppendInfoHandlerWrapper(ref))),
	}
	if platform != "" {
		opts = append(opts, containerd.WithPlatform(platform))
	}
	img, err := client.Pull(ctx, ref, opts...)
	if err != nil {
		return err
	}
	fmt.Println(img.Target().Digest)
	return nil
}
