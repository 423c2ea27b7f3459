// Subcommands of goref (v0.18 build) for zstd:chunked: the reference's
// zstdchunked decompressor and compressor, with tar-split and klauspost
// zstd, read and write zstd:chunked blobs for our interop tests and
// benchmarks.
//
//	goref verify-zstdchunked BLOB TOCDIGEST TARSPLIT_OFFSET:LEN:ULEN DIFFID
//	    estargz.Open with the zstdchunked decompressor, VerifyTOC, every
//	    chunk of every file through its verifier; then the tar-split data
//	    (located as the tarsplit-position annotation says) reassembled with
//	    tar-split's own asm package from the files read through the reader
//	    must hash to DIFFID, as containers/storage rebuilds a layer.
//	    Prints one JSON line: {"tocDigest", "files", "chunks", "diffID"}.
//	goref convert-zstdchunked IN.tar OUT LEVEL [PRIORITIZED...]
//	    The reference converter (estargz.Build with zstdchunked.Compressor
//	    at zstd.EncoderLevelFromZstd(LEVEL), as ctr-remote --zstdchunked;
//	    $CHUNK_SIZE sets its chunk size).
//	    Prints {"seconds", "size", "tocDigest", "diffID", "annotations"}.
package main

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/containerd/stargz-snapshotter/estargz/zstdchunked"
	"github.com/klauspost/compress/zstd"
	digest "github.com/opencontainers/go-digest"
	"github.com/vbatts/tar-split/tar/asm"
	"github.com/vbatts/tar-split/tar/storage"
)

func init() {
	extraCommands["verify-zstdchunked"] = cmdVerifyZstdChunked
	extraCommands["convert-zstdchunked"] = cmdConvertZstdChunked
}

// fileGetter hands tar-split's assembler each file's bytes through the Reader.
type fileGetter struct{ r *estargz.Reader }

func (g fileGetter) Get(name string) (io.ReadCloser, error) {
	fr, err := g.r.OpenFile(name)
	if err != nil {
		return nil, fmt.Errorf("OpenFile(%q): %v", name, err)
	}
	e, _ := g.r.Lookup(name)
	return io.NopCloser(io.NewSectionReader(fr, 0, e.Size)), nil
}

func cmdVerifyZstdChunked(args []string) error {
	if len(args) != 4 {
		return errors.New("usage: goref verify-zstdchunked BLOB TOCDIGEST TARSPLIT_POSITION DIFFID")
	}
	want, err := digest.Parse(args[1])
	if err != nil {
		return err
	}
	f, sr, err := openSection(args[0])
	if err != nil {
		return err
	}
	defer f.Close()
	r, err := estargz.Open(sr, estargz.WithDecompressors(new(zstdchunked.Decompressor)))
	if err != nil {
		return fmt.Errorf("estargz.Open: %v", err)
	}
	v, err := r.VerifyTOC(want)
	if err != nil {
		return fmt.Errorf("VerifyTOC: %v", err)
	}
	files, chunks := 0, 0
	var walk func(dir string, e *estargz.TOCEntry) error
	walk = func(dir string, e *estargz.TOCEntry) error {
		var ferr error
		e.ForeachChild(func(base string, ent *estargz.TOCEntry) bool {
			name := base
			if dir != "" {
				name = dir + "/" + base
			}
			if ent.Type == "dir" {
				ferr = walk(name, ent)
			} else if ent.Type == "reg" {
				_, n, err := verifyFile(r, v, name, ent.Size)
				files++
				chunks += n
				ferr = err
			}
			return ferr == nil
		})
		return ferr
	}
	root, ok := r.Lookup("")
	if !ok {
		return errors.New("no root entry")
	}
	if err := walk("", root); err != nil {
		return err
	}

	// tar-split: rebuild the uncompressed tar as containers/storage does.
	var off, clen, ulen int64
	if _, err := fmt.Sscanf(args[2], "%d:%d:%d", &off, &clen, &ulen); err != nil {
		return fmt.Errorf("bad tar-split position %q: %v", args[2], err)
	}
	comp := make([]byte, clen)
	if _, err := sr.ReadAt(comp, off); err != nil {
		return fmt.Errorf("reading tar-split: %v", err)
	}
	dec, err := zstd.NewReader(nil)
	if err != nil {
		return err
	}
	raw, err := dec.DecodeAll(comp, nil)
	if err != nil {
		return fmt.Errorf("tar-split is not zstd: %v", err)
	}
	if int64(len(raw)) != ulen {
		return fmt.Errorf("tar-split is %d bytes, position says %d", len(raw), ulen)
	}
	rc := asm.NewOutputTarStream(fileGetter{r}, storage.NewJSONUnpacker(bytes.NewReader(raw)))
	h := sha256.New()
	if _, err := io.Copy(h, rc); err != nil {
		return fmt.Errorf("tar-split reassembly: %v", err)
	}
	rc.Close()
	diffID := "sha256:" + hex.EncodeToString(h.Sum(nil))
	if diffID != args[3] {
		return fmt.Errorf("tar-split reassembles to %s, expected %s", diffID, args[3])
	}
	return printJSON(os.Stdout, map[string]interface{}{
		"tocDigest": r.TOCDigest().String(), "files": files, "chunks": chunks, "diffID": diffID})
}

type zstdCompression struct {
	*zstdchunked.Decompressor
	*zstdchunked.Compressor
}

func cmdConvertZstdChunked(args []string) error {
	if len(args) < 3 {
		return errors.New("usage: goref convert-zstdchunked IN.tar OUT LEVEL [PRIORITIZED...]")
	}
	level, err := strconv.Atoi(args[2])
	if err != nil {
		return err
	}
	started := time.Now()
	f, sr, err := openSection(args[0])
	if err != nil {
		return err
	}
	defer f.Close()
	metadata := map[string]string{}
	opts := []estargz.Option{estargz.WithCompression(&zstdCompression{
		new(zstdchunked.Decompressor),
		&zstdchunked.Compressor{CompressionLevel: zstd.EncoderLevelFromZstd(level), Metadata: metadata},
	})}
	if len(args) > 3 {
		opts = append(opts, estargz.WithPrioritizedFiles(args[3:]))
	}
	if cs := os.Getenv("CHUNK_SIZE"); cs != "" {
		n, err := strconv.Atoi(cs)
		if err != nil {
			return fmt.Errorf("bad CHUNK_SIZE %q", cs)
		}
		opts = append(opts, estargz.WithChunkSize(n))
	}
	res, err := buildTo(args[1], sr, opts...)
	if err != nil {
		return err
	}
	return printJSON(os.Stdout, map[string]interface{}{
		"seconds": time.Since(started).Seconds(), "size": res.BlobSize,
		"tocDigest": res.TOCDigest, "diffID": res.DiffID, "annotations": metadata})
}
