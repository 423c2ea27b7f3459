// soci-ztoc: the reference zTOC code of soci-snapshotter (its ztoc and
// ztoc/compression packages, cgo over zlib) as a checker for the zTOCs
// estargz writes (tests/test_ztoc.py). Built by scripts/build-go.sh soci-ztoc.
//
//	soci-ztoc build LAYER SPAN OUT   write soci's zTOC of LAYER (gzip, or a
//	                                 plain tar when LAYER ends in .tar)
//	soci-ztoc info ZTOC              print the whole zTOC as JSON, checkpoints decoded
//	soci-ztoc extract ZTOC LAYER     extract every regular file through the
//	                                 zTOC's spans; print "sha256  name" lines
//
// Exit status: 0 ok, 1 error (one line on stderr), 2 usage.
package main

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/awslabs/soci-snapshotter/ztoc"
	"github.com/awslabs/soci-snapshotter/ztoc/compression"
)

// BuildTool is soci create's default build tool identifier.
const BuildTool = "AWS SOCI CLI v0.2"

const winSize = 32768

type checkpoint struct {
	In           int64  `json:"in"`
	Out          int64  `json:"out"`
	Bits         uint8  `json:"bits"`
	WindowSHA256 string `json:"window_sha256"`
}

type span struct {
	ID     int32  `json:"id"`
	Start  int64  `json:"compressed_start"`
	End    int64  `json:"compressed_end"`
	UStart int64  `json:"uncompressed_start"`
	Digest string `json:"digest"`
}

type file struct {
	Name               string            `json:"name"`
	Type               string            `json:"type"`
	UncompressedOffset int64             `json:"uncompressed_offset"`
	UncompressedSize   int64             `json:"uncompressed_size"`
	TarHeaderOffset    int64             `json:"tar_header_offset"`
	Linkname           string            `json:"linkname"`
	Mode               int64             `json:"mode"`
	UID                int               `json:"uid"`
	GID                int               `json:"gid"`
	Uname              string            `json:"uname"`
	Gname              string            `json:"gname"`
	ModTime            string            `json:"mod_time"`
	Devmajor           int64             `json:"devmajor"`
	Devminor           int64             `json:"devminor"`
	PAXHeaders         map[string]string `json:"pax_headers"`
}

type info struct {
	Version                 string       `json:"version"`
	BuildToolIdentifier     string       `json:"build_tool_identifier"`
	CompressedArchiveSize   int64        `json:"compressed_archive_size"`
	UncompressedArchiveSize int64        `json:"uncompressed_archive_size"`
	CompressionAlgorithm    string       `json:"compression_algorithm"`
	MaxSpanID               int32        `json:"max_span_id"`
	SpanSize                int64        `json:"span_size"`
	Checkpoints             []checkpoint `json:"checkpoints"`
	Spans                   []span       `json:"spans"`
	Files                   []file       `json:"files"`
}

func die(code int, format string, a ...any) {
	fmt.Fprintf(os.Stderr, "soci-ztoc: "+format+"\n", a...)
	os.Exit(code)
}

func load(path string) *ztoc.Ztoc {
	f, err := os.Open(path)
	if err != nil {
		die(1, "%v", err)
	}
	defer f.Close()
	z, err := ztoc.Unmarshal(f)
	if err != nil {
		die(1, "%s: %v", path, err)
	}
	return z
}

// gzipCheckpoints decodes soci's zinfo blob (gzip_zinfo.c, version 2):
// int32 count, int64 span size, then per checkpoint int64 in, int64 out,
// one byte of bits and the 32 KiB window, all little-endian.
func gzipCheckpoints(blob []byte) ([]checkpoint, int64) {
	if len(blob) < 12 {
		die(1, "checkpoints blob of %d bytes", len(blob))
	}
	n := int(int32(binary.LittleEndian.Uint32(blob)))
	spanSize := int64(binary.LittleEndian.Uint64(blob[4:]))
	if 12+n*(17+winSize) != len(blob) {
		die(1, "checkpoints blob of %d bytes does not hold %d checkpoints", len(blob), n)
	}
	out := make([]checkpoint, 0, n)
	for i, at := 0, 12; i < n; i, at = i+1, at+17+winSize {
		w := sha256.Sum256(blob[at+17 : at+17+winSize])
		out = append(out, checkpoint{
			In:           int64(binary.LittleEndian.Uint64(blob[at:])),
			Out:          int64(binary.LittleEndian.Uint64(blob[at+8:])),
			Bits:         blob[at+16],
			WindowSHA256: hex.EncodeToString(w[:]),
		})
	}
	return out, spanSize
}

func cmdInfo(path string) {
	z := load(path)
	zi, err := z.Zinfo()
	if err != nil {
		die(1, "%s: checkpoints: %v", path, err)
	}
	defer zi.Close()
	out := info{
		Version:                 string(z.Version),
		BuildToolIdentifier:     z.BuildToolIdentifier,
		CompressedArchiveSize:   int64(z.CompressedArchiveSize),
		UncompressedArchiveSize: int64(z.UncompressedArchiveSize),
		CompressionAlgorithm:    z.CompressionAlgorithm,
		MaxSpanID:               int32(zi.MaxSpanID()),
		SpanSize:                int64(zi.SpanSize()),
		Checkpoints:             []checkpoint{},
		Spans:                   []span{},
		Files:                   []file{},
	}
	if z.CompressionAlgorithm == compression.Gzip {
		out.Checkpoints, _ = gzipCheckpoints(z.Checkpoints)
	}
	for i := compression.SpanID(0); i <= zi.MaxSpanID(); i++ {
		s := span{
			ID:     int32(i),
			Start:  int64(zi.StartCompressedOffset(i)),
			End:    int64(zi.EndCompressedOffset(i, z.CompressedArchiveSize)),
			UStart: int64(zi.StartUncompressedOffset(i)),
		}
		if int(i) < len(z.SpanDigests) {
			s.Digest = z.SpanDigests[i].String()
		}
		out.Spans = append(out.Spans, s)
	}
	for _, m := range z.FileMetadata {
		t, _ := m.ModTime.MarshalText()
		pax := m.PAXHeaders
		if pax == nil {
			pax = map[string]string{}
		}
		out.Files = append(out.Files, file{
			Name: m.Name, Type: m.Type,
			UncompressedOffset: int64(m.UncompressedOffset),
			UncompressedSize:   int64(m.UncompressedSize),
			TarHeaderOffset:    int64(m.TarHeaderOffset),
			Linkname:           m.Linkname, Mode: m.Mode, UID: m.UID, GID: m.GID,
			Uname: m.Uname, Gname: m.Gname, ModTime: string(t),
			Devmajor: m.Devmajor, Devminor: m.Devminor, PAXHeaders: pax,
		})
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", " ")
	if err := enc.Encode(out); err != nil {
		die(1, "%v", err)
	}
}

func cmdExtract(path, layer string) {
	z := load(path)
	f, err := os.Open(layer)
	if err != nil {
		die(1, "%v", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		die(1, "%v", err)
	}
	if st.Size() != int64(z.CompressedArchiveSize) {
		die(1, "layer is %d bytes, the zTOC says %d", st.Size(), z.CompressedArchiveSize)
	}
	sr := io.NewSectionReader(f, 0, st.Size())
	zi, err := z.Zinfo()
	if err != nil {
		die(1, "%s: checkpoints: %v", path, err)
	}
	defer zi.Close()
	for _, m := range z.FileMetadata {
		if m.Type != "reg" {
			continue
		}
		// ExtractFile looks files up by name and follows links; a layer
		// may hold a name twice (whiteouts, rewrites): extract the entry
		// itself through its spans, as the snapshotter's span manager does.
		data, err := extractEntry(z, zi, sr, m)
		if err != nil {
			die(1, "%s: %v", m.Name, err)
		}
		sum := sha256.Sum256(data)
		fmt.Printf("%s  %s\n", hex.EncodeToString(sum[:]), m.Name)
	}
}

// extractEntry is ztoc.ExtractFile for one metadata entry: fetch the
// compressed bytes of the spans holding it, inflate from the first span's
// checkpoint.
func extractEntry(z *ztoc.Ztoc, zi compression.Zinfo, sr *io.SectionReader, m ztoc.FileMetadata) ([]byte, error) {
	if m.UncompressedSize == 0 {
		return []byte{}, nil
	}
	first := zi.UncompressedOffsetToSpanID(m.UncompressedOffset)
	last := zi.UncompressedOffsetToSpanID(m.UncompressedOffset + m.UncompressedSize)
	start := zi.StartCompressedOffset(first)
	end := zi.EndCompressedOffset(last, z.CompressedArchiveSize)
	buf := make([]byte, end-start)
	if _, err := sr.ReadAt(buf, int64(start)); err != nil && err != io.EOF {
		return nil, err
	}
	data, err := zi.ExtractDataFromBuffer(buf, m.UncompressedSize, m.UncompressedOffset, first)
	if err != nil {
		return nil, err
	}
	if int64(len(data)) != int64(m.UncompressedSize) {
		return nil, fmt.Errorf("extracted %d bytes, want %d", len(data), m.UncompressedSize)
	}
	return data, nil
}

func cmdBuild(layer, spanArg, out string) {
	spanSize, err := strconv.ParseInt(spanArg, 10, 64)
	if err != nil || spanSize <= 0 {
		die(2, "span size %q is not a positive integer", spanArg)
	}
	algo := compression.Gzip
	if strings.HasSuffix(layer, ".tar") {
		algo = compression.Uncompressed
	}
	z, err := ztoc.NewBuilder(BuildTool).BuildZtoc(layer, spanSize, ztoc.WithCompression(algo))
	if err != nil {
		die(1, "%s: %v", layer, err)
	}
	r, _, err := ztoc.Marshal(z)
	if err != nil {
		die(1, "%v", err)
	}
	var b bytes.Buffer
	if _, err := io.Copy(&b, r); err != nil {
		die(1, "%v", err)
	}
	if err := os.WriteFile(out, b.Bytes(), 0o644); err != nil {
		die(1, "%v", err)
	}
}

func main() {
	// A zTOC's mod_time strings carry the zone of the machine that wrote
	// it (Go's time.Unix is local time); estargz writes UTC, as soci does
	// on any machine whose zone is UTC (containers, CI).
	time.Local = time.UTC
	args := os.Args[1:]
	switch {
	case len(args) == 4 && args[0] == "build":
		cmdBuild(args[1], args[2], args[3])
	case len(args) == 2 && args[0] == "info":
		cmdInfo(args[1])
	case len(args) == 3 && args[0] == "extract":
		cmdExtract(args[1], args[2])
	default:
		die(2, "usage: soci-ztoc build LAYER SPAN OUT | info ZTOC | extract ZTOC LAYER")
	}
}
