// goref-v018: the reference's newest Go packages (stargz-snapshotter
// estargz v0.18.x and its zstdchunked decompressor, tar-split, klauspost
// zstd) read and write zstd:chunked blobs, for our interop tests and
// benchmarks. Built by scripts/build-stargz-snapshotter.sh goref-v018.
//
//	goref-v018 verify BLOB TOCDIGEST TARSPLIT_OFFSET:LEN:ULEN DIFFID
//	    estargz.Open with the zstdchunked decompressor, VerifyTOC, every
//	    chunk of every file through its verifier; then the tar-split data
//	    (located as the tarsplit-position annotation says) reassembled with
//	    tar-split's own asm package from the files read through the reader
//	    must hash to DIFFID, as containers/storage rebuilds a layer.
//	    Prints one JSON line: {"tocDigest", "files", "chunks", "diffID"}.
//	goref-v018 convert IN.tar OUT LEVEL [PRIORITIZED...]
//	    The reference converter (estargz.Build with zstdchunked.Compressor
//	    at zstd.EncoderLevelFromZstd(LEVEL), as ctr-remote --zstdchunked;
//	    $CHUNK_SIZE sets its chunk size).
//	    Prints {"seconds", "size", "tocDigest", "annotations"}.
package main

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/containerd/stargz-snapshotter/estargz/zstdchunked"
	"github.com/klauspost/compress/zstd"
	digest "github.com/opencontainers/go-digest"
	"github.com/vbatts/tar-split/tar/asm"
	"github.com/vbatts/tar-split/tar/storage"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "goref-v018:", strings.ReplaceAll(err.Error(), "\n", " "))
		os.Exit(1)
	}
}

func run(args []string) error {
	if len(args) == 0 {
		return errors.New("usage: goref-v018 verify|convert ...")
	}
	switch args[0] {
	case "verify":
		return cmdVerify(args[1:])
	case "convert":
		return cmdConvert(args[1:])
	}
	return fmt.Errorf("unknown command %q", args[0])
}

func open(name string) (*os.File, *io.SectionReader, error) {
	f, err := os.Open(name)
	if err != nil {
		return nil, nil, err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, nil, err
	}
	return f, io.NewSectionReader(f, 0, st.Size()), nil
}

type fileGetter struct{ r *estargz.Reader }

func (g fileGetter) Get(name string) (io.ReadCloser, error) {
	fr, err := g.r.OpenFile(name)
	if err != nil {
		return nil, fmt.Errorf("OpenFile(%q): %v", name, err)
	}
	e, _ := g.r.Lookup(name)
	return io.NopCloser(io.NewSectionReader(fr, 0, e.Size)), nil
}

func cmdVerify(args []string) error {
	if len(args) != 4 {
		return errors.New("usage: goref-v018 verify BLOB TOCDIGEST TARSPLIT_POSITION DIFFID")
	}
	want, err := digest.Parse(args[1])
	if err != nil {
		return err
	}
	f, sr, err := open(args[0])
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
				n, err := verifyFile(r, v, name, ent.Size)
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
	return json.NewEncoder(os.Stdout).Encode(map[string]interface{}{
		"tocDigest": r.TOCDigest().String(), "files": files, "chunks": chunks, "diffID": diffID})
}

// verifyFile reads a file chunk by chunk through the Reader and checks each
// chunk with the TOCEntryVerifier (how the snapshotter reads lazily).
func verifyFile(r *estargz.Reader, v estargz.TOCEntryVerifier, name string, size int64) (int, error) {
	fr, err := r.OpenFile(name)
	if err != nil {
		return 0, fmt.Errorf("OpenFile(%q): %v", name, err)
	}
	n := 0
	for off := int64(0); off < size; {
		ce, ok := r.ChunkEntryForOffset(name, off)
		if !ok || ce.ChunkOffset != off || ce.ChunkSize <= 0 {
			return 0, fmt.Errorf("%q: no chunk entry for offset %d", name, off)
		}
		dv, err := v.Verifier(ce)
		if err != nil {
			return 0, fmt.Errorf("%q: chunk at %d: %v", name, off, err)
		}
		b := make([]byte, ce.ChunkSize)
		got, err := fr.ReadAt(b, off)
		if int64(got) != ce.ChunkSize || (err != nil && err != io.EOF) {
			return 0, fmt.Errorf("%q: reading chunk at %d: %d bytes: %v", name, off, got, err)
		}
		dv.Write(b)
		if !dv.Verified() {
			return 0, fmt.Errorf("%q: chunk at %d failed digest verification", name, off)
		}
		off += ce.ChunkSize
		n++
	}
	return n, nil
}

type zstdCompression struct {
	*zstdchunked.Decompressor
	*zstdchunked.Compressor
}

func cmdConvert(args []string) error {
	if len(args) < 3 {
		return errors.New("usage: goref-v018 convert IN.tar OUT LEVEL [PRIORITIZED...]")
	}
	level, err := strconv.Atoi(args[2])
	if err != nil {
		return err
	}
	started := time.Now()
	f, sr, err := open(args[0])
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
	blob, err := estargz.Build(sr, opts...)
	if err != nil {
		return fmt.Errorf("estargz.Build: %v", err)
	}
	defer blob.Close()
	out, err := os.Create(args[1])
	if err != nil {
		return err
	}
	n, err := io.Copy(out, blob)
	if err != nil {
		return err
	}
	if err := out.Close(); err != nil {
		return err
	}
	return json.NewEncoder(os.Stdout).Encode(map[string]interface{}{
		"seconds": time.Since(started).Seconds(), "size": n,
		"tocDigest": blob.TOCDigest().String(), "diffID": blob.DiffID().String(),
		"annotations": metadata})
}
