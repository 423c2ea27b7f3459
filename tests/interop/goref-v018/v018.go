// Subcommands of goref that need the reference v0.18 (module
// github.com/containerd/stargz-snapshotter/estargz v0.18.x): min-chunk-size
// (TOC entries with innerOffset), the external TOC and lossless
// (keep-diff-id) conversion, none of which Debian's 0.12 package has.
// scripts/build-go.sh goref-v018 builds this file and zstdchunked.go with
// ../goref/main.go in module mode through the Go module proxy.
//
//	goref verify-external BLOB TOCDIGEST TOCBLOB
//	goref build-v018 IN OUT [--chunk-size N] [--level N] [--prioritized FILE]
//	                        [--min-chunk-size N] [--external-toc TOCOUT] [--keep-diff-id]
package main

import (
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/containerd/stargz-snapshotter/estargz/externaltoc"
	digest "github.com/opencontainers/go-digest"
)

func init() {
	extraCommands["verify-external"] = cmdVerifyExternal
	extraCommands["build-v018"] = cmdBuildV018
	verifyTOCFallback = chunkDigestVerifier
}

// chunkDigestVerifier stands in for VerifyTOC on TOCs with innerOffset.
// v0.18's Reader.VerifyTOC keys its digests by compressed offset and refuses
// any TOC where two chunks share one ("offset N found twice"): every blob
// written with a min chunk size, its own included. The snapshotter never
// calls it; fs/reader checks the TOC digest and then each chunk it reads
// against that chunk's chunkDigest, which is what this verifier does.
func chunkDigestVerifier(r *estargz.Reader, toc *estargz.JTOC, want digest.Digest,
	err error) (estargz.TOCEntryVerifier, error) {
	shared := false
	for _, e := range toc.Entries {
		shared = shared || e.InnerOffset != 0
	}
	if !shared {
		return nil, err
	}
	if got := r.TOCDigest(); got != want {
		return nil, fmt.Errorf("invalid TOC JSON %q; want %q", got, want)
	}
	fmt.Fprintf(os.Stderr, "goref: VerifyTOC refused a TOC with innerOffset (%v); "+
		"checking each chunk against its chunkDigest as the snapshotter does\n", err)
	return chunkDigests{}, nil
}

type chunkDigests struct{}

func (chunkDigests) Verifier(ce *estargz.TOCEntry) (digest.Verifier, error) {
	d, err := digest.Parse(ce.ChunkDigest)
	if err != nil {
		return nil, fmt.Errorf("chunk at offset %d/%d: bad chunkDigest %q: %v",
			ce.Offset, ce.InnerOffset, ce.ChunkDigest, err)
	}
	return d.Verifier(), nil
}

// cmdVerifyExternal is `verify` for a blob whose TOC lives in a separate
// TOC blob (footer "STARGZEXTERNALTOC"), read as the snapshotter does:
// through externaltoc's decompressor, handed the TOC blob's bytes.
func cmdVerifyExternal(args []string) error {
	a, err := parseArgs(args, nil, nil)
	if err != nil {
		return err
	}
	if len(a.pos) != 3 {
		return errors.New("usage: goref verify-external BLOB TOCDIGEST TOCBLOB")
	}
	want, err := digest.Parse(a.pos[1])
	if err != nil {
		return fmt.Errorf("bad TOCDIGEST %q: %v", a.pos[1], err)
	}
	tocBlob, err := os.ReadFile(a.pos[2])
	if err != nil {
		return err
	}
	provide := func() ([]byte, error) { return tocBlob, nil }
	f, sr, err := openSection(a.pos[0])
	if err != nil {
		return err
	}
	defer f.Close()
	r, err := estargz.Open(sr, estargz.WithDecompressors(externaltoc.NewGzipDecompressor(provide)))
	if err != nil {
		return fmt.Errorf("estargz.Open: %v", err)
	}
	toc, _, err := externaltoc.NewGzipDecompressor(provide).ParseTOC(nil)
	if err != nil {
		return fmt.Errorf("parsing TOC blob: %v", err)
	}
	return verifyAll(r, toc, want)
}

type buildV018Result struct {
	buildResult
	TOCBlobDigest string `json:"tocBlobDigest,omitempty"`
	TOCBlobSize   int64  `json:"tocBlobSize,omitempty"`
}

// cmdBuildV018 converts as ctr-remote/nerdctl do with --estargz-min-chunk-size,
// --estargz-external-toc and --estargz-keep-diff-id: estargz.Build, or for
// keep-diff-id the nativeconverter's lossless path (Writer.AppendTarLossLess,
// no reordering, no landmark).
func cmdBuildV018(args []string) error {
	a, err := parseArgs(args,
		[]string{"chunk-size", "level", "prioritized", "min-chunk-size", "external-toc"},
		[]string{"keep-diff-id"})
	if err != nil {
		return err
	}
	if len(a.pos) != 2 {
		return errors.New("usage: goref build-v018 IN OUT [options]")
	}
	in, out := a.pos[0], a.pos[1]
	intFlag := func(name string, def int) (int, error) {
		v, ok := a.vals[name]
		if !ok {
			return def, nil
		}
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 {
			return 0, fmt.Errorf("--%s: want a non-negative integer, got %q", name, v)
		}
		return n, nil
	}
	chunkSize, err := intFlag("chunk-size", 0)
	if err != nil {
		return err
	}
	level, err := intFlag("level", gzip.BestCompression)
	if err != nil {
		return err
	}
	minChunk, err := intFlag("min-chunk-size", 0)
	if err != nil {
		return err
	}
	tocOut, external := a.vals["external-toc"]
	lossless := a.bools["keep-diff-id"]
	if lossless && !external {
		return errors.New("--keep-diff-id needs --external-toc")
	}

	inF, inSR, err := openSection(in)
	if err != nil {
		return err
	}
	defer inF.Close()
	var res buildV018Result
	var ext *externaltoc.GzipCompression
	if external {
		ext = externaltoc.NewGzipCompressionWithLevel(nil, level).(*externaltoc.GzipCompression)
	}
	if lossless {
		res.BlobDigest, res.BlobSize, err = writeTo(out, func(bw io.Writer) error {
			w := estargz.NewWriterWithCompressor(bw, ext)
			w.ChunkSize = chunkSize
			w.MinChunkSize = minChunk
			if err := w.AppendTarLossLess(inSR); err != nil {
				return fmt.Errorf("AppendTarLossLess: %v", err)
			}
			tocDigest, err := w.Close()
			res.TOCDigest, res.DiffID = tocDigest.String(), w.DiffID()
			return err
		})
		if err != nil {
			return err
		}
	} else {
		var opts []estargz.Option
		if chunkSize > 0 {
			opts = append(opts, estargz.WithChunkSize(chunkSize))
		}
		if minChunk > 0 {
			opts = append(opts, estargz.WithMinChunkSize(minChunk))
		}
		if ext != nil {
			opts = append(opts, estargz.WithCompression(ext))
		} else {
			opts = append(opts, estargz.WithCompressionLevel(level))
		}
		if v, ok := a.vals["prioritized"]; ok {
			files, err := readLines(v)
			if err != nil {
				return fmt.Errorf("--prioritized: %v", err)
			}
			opts = append(opts, estargz.WithPrioritizedFiles(files))
		}
		if res.buildResult, err = buildTo(out, inSR, opts...); err != nil {
			return err
		}
	}
	if ext != nil {
		res.TOCBlobDigest, res.TOCBlobSize, err = writeTo(tocOut, func(w io.Writer) error {
			_, err := ext.WriteTOCTo(w)
			return err
		})
		if err != nil {
			return err
		}
	}
	return printJSON(os.Stdout, res)
}
