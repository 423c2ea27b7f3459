// storage-chunked: current containers/storage (go.podman.io/storage, the
// library podman and CRI-O use) applies a zstd:chunked blob the way a partial
// pull does, from a local file instead of a registry. Built by
// scripts/build-go.sh storage-chunked; needs root (overlay).
//
//	storage-chunked BLOB ANNOTATIONS_JSON ROOT
//
// NewDiffer reads the TOC and the tar-split data by the annotations and
// validates both checksums; PrepareStagedLayer fetches every file's ranges,
// checks each file's digest, writes the tree into ROOT's staging area, then
// rebuilds the uncompressed tar from the tar-split data and the files and
// digests it (what c/image compares with the config's diff_id). Prints
// {"uncompressedDigest", "tocDigest", "size", "files"} on success.
package main

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	digest "github.com/opencontainers/go-digest"
	"go.podman.io/storage"
	"go.podman.io/storage/pkg/chunked"
	"go.podman.io/storage/types"
)

type fileSource struct{ f *os.File }

func (s fileSource) GetBlobAt(chunks []chunked.ImageSourceChunk) (chan io.ReadCloser, chan error, error) {
	parts := make(chan io.ReadCloser, len(chunks))
	errs := make(chan error, 1)
	go func() {
		for _, c := range chunks {
			parts <- io.NopCloser(io.NewSectionReader(s.f, int64(c.Offset), int64(c.Length)))
		}
		close(parts)
		close(errs)
	}()
	return parts, errs, nil
}

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "storage-chunked:", strings.ReplaceAll(err.Error(), "\n", " "))
		os.Exit(1)
	}
}

func run(args []string) error {
	if len(args) != 3 {
		return fmt.Errorf("usage: storage-chunked BLOB ANNOTATIONS_JSON ROOT")
	}
	var annotations map[string]string
	if err := json.Unmarshal([]byte(args[1]), &annotations); err != nil {
		return fmt.Errorf("annotations: %v", err)
	}
	f, err := os.Open(args[0])
	if err != nil {
		return err
	}
	defer f.Close()
	h := sha256.New()
	size, err := io.Copy(h, f)
	if err != nil {
		return err
	}
	blobDigest := digest.NewDigestFromBytes(digest.SHA256, h.Sum(nil))
	store, err := storage.GetStore(types.StoreOptions{
		RunRoot: filepath.Join(args[2], "run"), GraphRoot: filepath.Join(args[2], "graph"),
		GraphDriverName: "overlay",
		PullOptions:     map[string]string{"enable_partial_images": "true"},
	})
	if err != nil {
		return fmt.Errorf("GetStore: %v", err)
	}
	defer store.Shutdown(true)
	differ, err := chunked.NewDiffer(context.Background(), store, blobDigest, size, annotations, fileSource{f})
	if err != nil {
		return fmt.Errorf("NewDiffer: %v", err)
	}
	out, err := store.PrepareStagedLayer(nil, differ)
	if err != nil {
		return fmt.Errorf("PrepareStagedLayer: %v", err)
	}
	defer store.CleanupStagedLayer(out)
	files := 0
	err = filepath.WalkDir(out.Target, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() {
			files++
		}
		return err
	})
	if err != nil {
		return err
	}
	return json.NewEncoder(os.Stdout).Encode(map[string]interface{}{
		"uncompressedDigest": out.UncompressedDigest.String(), "tocDigest": out.TOCDigest.String(),
		"size": out.Size, "files": files})
}
