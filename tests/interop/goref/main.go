// Command goref is a thin CLI over the reference eStargz implementation
// (github.com/containerd/stargz-snapshotter/estargz, as packaged by Debian).
//
// The Python test-suite and benchmarks shell out to it to prove that blobs we
// produce are accepted by the reference reader, and that blobs the reference
// produces are accepted by us. It is deliberately small: every subcommand maps
// onto one or two calls of the estargz package so that any disagreement is a
// disagreement with the reference, not with logic of our own.
//
// Usage:
//
//	goref verify BLOB TOCDIGEST
//	goref build IN OUT [--chunk-size N] [--level N] [--prioritized FILE] [--allow-missing]
//	goref tocdigest BLOB
//
// Built against the reference v0.18 with ../goref-v018 (scripts/build-go.sh
// goref-v018), it has the subcommands that version adds: build-v018 and
// verify-external (v018.go), verify-zstdchunked and convert-zstdchunked
// (zstdchunked.go).
//
// On success the exit status is 0. On failure a single line
// "goref: <error>" is written to stderr and the exit status is 1.
package main

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"strconv"
	"strings"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"
	digest "github.com/opencontainers/go-digest"
)

const usage = `usage:
  goref verify BLOB TOCDIGEST
  goref build IN OUT [--chunk-size N] [--level N] [--prioritized FILE] [--allow-missing]
  goref tocdigest BLOB`

func main() {
	if err := safeRun(os.Args[1:]); err != nil {
		// Callers parse stderr line-wise, so squash multi-line errors (the
		// package's errorutil.Aggregate uses newlines and tabs) into one line.
		fmt.Fprintf(os.Stderr, "goref: %s\n", oneLine(err.Error()))
		os.Exit(1)
	}
}

// safeRun turns a panic into an ordinary error. The reference panics on some
// corrupt inputs (e.g. estargz.Open slices out of range when the footer's TOC
// offset is garbage), and a corrupt blob must be reported like any other
// verification failure: one stderr line and exit 1, not exit 2 and a trace.
func safeRun(args []string) (err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("panic in reference implementation: %v", p)
		}
	}()
	return run(args)
}

func run(args []string) error {
	if len(args) == 0 {
		return errors.New("missing subcommand; " + oneLine(usage))
	}
	cmd, rest := args[0], args[1:]
	switch cmd {
	case "verify":
		return cmdVerify(rest)
	case "build":
		return cmdBuild(rest)
	case "tocdigest":
		return cmdTOCDigest(rest)
	case "-h", "--help", "help":
		fmt.Println(usage)
		return nil
	default:
		if extra, ok := extraCommands[cmd]; ok {
			return extra(rest)
		}
		return fmt.Errorf("unknown subcommand %q; %s", cmd, oneLine(usage))
	}
}

// extraCommands holds subcommands that only a newer reference offers; the
// v0.18 build (tests/interop/goref-v018, built by scripts/build-go.sh
// goref-v018) adds its files to this program and registers them from init
// functions.
var extraCommands = map[string]func([]string) error{}

// verifyTOCFallback, when set (by the v0.18 build), is asked for a verifier
// after VerifyTOC refused the TOC with err.
var verifyTOCFallback func(r *estargz.Reader, toc *estargz.JTOC, want digest.Digest, err error) (estargz.TOCEntryVerifier, error)

func oneLine(s string) string {
	return strings.Join(strings.Fields(strings.ReplaceAll(s, "\n", " ")), " ")
}

// ---------------------------------------------------------------------------
// Argument parsing
// ---------------------------------------------------------------------------

// cliArgs is the result of parseArgs: positionals in order plus flag values.
type cliArgs struct {
	pos   []string
	vals  map[string]string // flags that take a value
	bools map[string]bool   // boolean flags that were present
}

// parseArgs is a tiny hand-rolled parser. The standard flag package stops at
// the first positional argument, but our callers naturally write
// "goref build in.tar out.esgz --chunk-size 1000", so flags are accepted
// anywhere. Both "--flag value" and "--flag=value" work, a single leading
// dash is accepted too, and "--" ends flag parsing.
func parseArgs(args []string, valueFlags, boolFlags []string) (*cliArgs, error) {
	isValue := map[string]bool{}
	for _, f := range valueFlags {
		isValue[f] = true
	}
	isBool := map[string]bool{}
	for _, f := range boolFlags {
		isBool[f] = true
	}
	out := &cliArgs{vals: map[string]string{}, bools: map[string]bool{}}
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "--" {
			out.pos = append(out.pos, args[i+1:]...)
			break
		}
		// "-" alone is a conventional positional (stdin); we don't support it,
		// but it should not be mistaken for a flag either.
		if !strings.HasPrefix(a, "-") || a == "-" {
			out.pos = append(out.pos, a)
			continue
		}
		name := strings.TrimLeft(a, "-")
		var val string
		hasVal := false
		if eq := strings.IndexByte(name, '='); eq >= 0 {
			name, val, hasVal = name[:eq], name[eq+1:], true
		}
		switch {
		case isValue[name]:
			if !hasVal {
				if i+1 >= len(args) {
					return nil, fmt.Errorf("flag --%s needs a value", name)
				}
				i++
				val = args[i]
			}
			out.vals[name] = val
		case isBool[name]:
			if hasVal {
				b, err := strconv.ParseBool(val)
				if err != nil {
					return nil, fmt.Errorf("flag --%s: %v", name, err)
				}
				out.bools[name] = b
			} else {
				out.bools[name] = true
			}
		default:
			return nil, fmt.Errorf("unknown flag %q", a)
		}
	}
	return out, nil
}

// openSection opens a file and wraps it in the io.SectionReader that the
// estargz API wants. The caller closes the returned file.
func openSection(name string) (*os.File, *io.SectionReader, error) {
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

// printJSON writes v as a single line of JSON to w.
func printJSON(w io.Writer, v interface{}) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	b = append(b, '\n')
	_, err = w.Write(b)
	return err
}

// ---------------------------------------------------------------------------
// tocdigest
// ---------------------------------------------------------------------------

// cmdTOCDigest prints the digest of the (uncompressed) TOC JSON, which is
// what `ctr-remote get-toc-digest` prints and what goes into the
// containerd.io/snapshot/stargz/toc.digest annotation.
func cmdTOCDigest(args []string) error {
	a, err := parseArgs(args, nil, nil)
	if err != nil {
		return err
	}
	if len(a.pos) != 1 {
		return errors.New("usage: goref tocdigest BLOB")
	}
	f, sr, err := openSection(a.pos[0])
	if err != nil {
		return err
	}
	defer f.Close()
	r, err := estargz.Open(sr)
	if err != nil {
		return fmt.Errorf("estargz.Open: %v", err)
	}
	fmt.Println(r.TOCDigest().String())
	return nil
}

// ---------------------------------------------------------------------------
// build
// ---------------------------------------------------------------------------

type buildResult struct {
	TOCDigest  string `json:"tocDigest"`
	DiffID     string `json:"diffID"`
	BlobDigest string `json:"blobDigest"`
	BlobSize   int64  `json:"blobSize"`
}

func cmdBuild(args []string) error {
	a, err := parseArgs(args,
		[]string{"chunk-size", "level", "prioritized"},
		[]string{"allow-missing"})
	if err != nil {
		return err
	}
	if len(a.pos) != 2 {
		return errors.New("usage: goref build IN OUT [--chunk-size N] [--level N] [--prioritized FILE] [--allow-missing]")
	}
	in, out := a.pos[0], a.pos[1]

	// Only pass options that were asked for, so that "no flag" means "the
	// reference's own default" (4 MiB chunks, gzip.BestCompression) rather
	// than a default we picked.
	var opts []estargz.Option
	if v, ok := a.vals["chunk-size"]; ok {
		n, err := strconv.Atoi(v)
		if err != nil || n <= 0 {
			return fmt.Errorf("--chunk-size: want a positive integer, got %q", v)
		}
		opts = append(opts, estargz.WithChunkSize(n))
	}
	if v, ok := a.vals["level"]; ok {
		n, err := strconv.Atoi(v)
		// compress/gzip accepts -2 (HuffmanOnly) .. 9 (BestCompression).
		if err != nil || n < -2 || n > 9 {
			return fmt.Errorf("--level: want an integer in -2..9, got %q", v)
		}
		opts = append(opts, estargz.WithCompressionLevel(n))
	}
	if v, ok := a.vals["prioritized"]; ok {
		files, err := readLines(v)
		if err != nil {
			return fmt.Errorf("--prioritized: %v", err)
		}
		opts = append(opts, estargz.WithPrioritizedFiles(files))
	}
	var missed []string
	if a.bools["allow-missing"] {
		opts = append(opts, estargz.WithAllowPrioritizeNotFound(&missed))
	}

	inF, inSR, err := openSection(in)
	if err != nil {
		return err
	}
	defer inF.Close()

	res, err := buildTo(out, inSR, opts...)
	if err != nil {
		return err
	}
	for _, m := range missed {
		fmt.Fprintf(os.Stderr, "missing: %s\n", m)
	}
	return printJSON(os.Stdout, res)
}

// buildTo runs estargz.Build over in and writes the blob to file out.
func buildTo(out string, in *io.SectionReader, opts ...estargz.Option) (res buildResult, rErr error) {
	blob, err := estargz.Build(in, opts...)
	if err != nil {
		return res, fmt.Errorf("estargz.Build: %v", err)
	}
	// Close removes Build's temp files; it must run even on error paths.
	defer func() {
		if cerr := blob.Close(); cerr != nil && rErr == nil {
			rErr = fmt.Errorf("closing blob: %v", cerr)
		}
	}()
	if res.BlobDigest, res.BlobSize, err = writeBlob(out, blob); err != nil {
		return res, err
	}
	// DiffID is only valid once the blob has been read to EOF (Build hashes
	// the decompressed stream as it is consumed), which writeBlob has done.
	res.TOCDigest, res.DiffID = blob.TOCDigest().String(), blob.DiffID().String()
	return res, nil
}

// writeTo creates file out, hands write a buffered writer into it, and
// returns the sha256 digest and size of what was written. On any error the
// file is removed: a truncated blob must not be picked up by a later test.
func writeTo(out string, write func(io.Writer) error) (digest string, size int64, rErr error) {
	f, err := os.Create(out)
	if err != nil {
		return "", 0, err
	}
	defer func() {
		if rErr != nil {
			os.Remove(out)
		}
	}()
	h := sha256.New()
	bw := bufio.NewWriterSize(f, 1<<20)
	cw := &countingWriter{w: io.MultiWriter(bw, h)}
	err = write(cw)
	if err == nil {
		err = bw.Flush()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return "", 0, fmt.Errorf("writing %s: %v", out, err)
	}
	return "sha256:" + hex.EncodeToString(h.Sum(nil)), cw.n, nil
}

// writeBlob is writeTo for a blob estargz.Build made.
func writeBlob(out string, blob io.Reader) (string, int64, error) {
	return writeTo(out, func(w io.Writer) error {
		_, err := io.Copy(w, blob)
		return err
	})
}

type countingWriter struct {
	w io.Writer
	n int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

// readLines returns the non-empty lines of a file, without line terminators.
// Leading/trailing spaces are kept because they are legal in tar names.
func readLines(name string) ([]string, error) {
	b, err := os.ReadFile(name)
	if err != nil {
		return nil, err
	}
	var lines []string
	for _, l := range strings.Split(string(b), "\n") {
		l = strings.TrimSuffix(l, "\r")
		if l != "" {
			lines = append(lines, l)
		}
	}
	return lines, nil
}

// ---------------------------------------------------------------------------
// verify
// ---------------------------------------------------------------------------

// entryRecord is one JSON line of `goref verify` output. Field order is fixed
// by the struct, and xattr keys are sorted by encoding/json, so the output is
// byte-for-byte deterministic for a given blob.
type entryRecord struct {
	Name      string            `json:"name"`
	Type      string            `json:"type"`
	Size      int64             `json:"size"`
	Mode      int64             `json:"mode"`
	UID       int               `json:"uid"`
	GID       int               `json:"gid"`
	UserName  string            `json:"userName"`
	GroupName string            `json:"groupName"`
	LinkName  string            `json:"linkName"`
	DevMajor  int               `json:"devMajor"`
	DevMinor  int               `json:"devMinor"`
	ModTime   string            `json:"modtime"`
	Xattrs    map[string][]byte `json:"xattrs"` // []byte marshals as base64
	SHA256    string            `json:"sha256"`
	Chunks    int               `json:"chunks"`
}

type verifySummary struct {
	TOCDigest string `json:"tocDigest"`
	Entries   int    `json:"entries"`
}

func cmdVerify(args []string) error {
	a, err := parseArgs(args, nil, nil)
	if err != nil {
		return err
	}
	if len(a.pos) != 2 {
		return errors.New("usage: goref verify BLOB TOCDIGEST")
	}
	blobPath := a.pos[0]
	want, err := digest.Parse(a.pos[1])
	if err != nil {
		return fmt.Errorf("bad TOCDIGEST %q: %v", a.pos[1], err)
	}

	f, sr, err := openSection(blobPath)
	if err != nil {
		return err
	}
	defer f.Close()

	r, err := estargz.Open(sr)
	if err != nil {
		return fmt.Errorf("estargz.Open: %v", err)
	}
	// The Reader does not expose its entry list (only name lookups), so to
	// walk entries in TOC order we decode the TOC a second time ourselves,
	// using the package's own footer and TOC parsers. This copy is raw: names
	// are not cleaned and elided userName/groupName are not filled in.
	toc, err := readRawTOC(sr)
	if err != nil {
		return err
	}
	return verifyAll(r, toc, want)
}

// verifyAll checks the TOC digest, then prints one record per TOC entry with
// every regular file read chunk by chunk through the verifier.
func verifyAll(r *estargz.Reader, toc *estargz.JTOC, want digest.Digest) error {
	// VerifyTOC checks the TOC digest and that every chunk has a digest.
	v, err := r.VerifyTOC(want)
	if err != nil && verifyTOCFallback != nil {
		v, err = verifyTOCFallback(r, toc, want, err)
	}
	if err != nil {
		return fmt.Errorf("VerifyTOC: %v", err)
	}

	out := bufio.NewWriter(os.Stdout)
	defer out.Flush()

	// Mirror of the uid->name / gid->name memory that Reader.initFields keeps
	// while walking the TOC. The writer omits a userName/groupName that equals
	// the previous one for the same id, and the reader re-fills it from these
	// maps. We need our own copy only for hardlink entries, because
	// r.Lookup() follows hardlinks to their target and so never returns the
	// hardlink entry itself.
	unames := map[int]string{}
	gnames := map[int]string{}

	count := 0
	for _, raw := range toc.Entries {
		if raw.Type == "chunk" {
			continue
		}
		name := cleanName(raw.Name)

		// Keep the mirror in lock-step with initFields, including its quirk
		// that a missing groupName is looked up in the *user* name map.
		uname, gname := raw.Uname, raw.Gname
		if uname != "" {
			unames[raw.UID] = uname
		} else {
			uname = unames[raw.UID]
		}
		if gname != "" {
			gnames[raw.GID] = gname
		} else {
			gname = unames[raw.GID]
		}

		var rec entryRecord
		if raw.Type == "hardlink" {
			// Report the hardlink entry's own metadata. Resolve the target
			// anyway so a dangling link is an error, as it is for the reader.
			if _, ok := r.Lookup(name); !ok {
				return fmt.Errorf("%q: hardlink target %q not found", name, raw.LinkName)
			}
			rec = recordFrom(raw, name)
			rec.UserName, rec.GroupName = uname, gname
			rec.ModTime = formatTime(parseTime(raw.ModTime3339))
		} else {
			e, ok := r.Lookup(name)
			if !ok {
				return fmt.Errorf("%q: listed in TOC but not found by Reader.Lookup", name)
			}
			// Use what the Reader exposes (names cleaned, user/group names
			// filled in, modtime parsed) rather than our raw copy.
			rec = recordFrom(e, name)
			rec.ModTime = formatTime(e.ModTime())
			if e.Type == "reg" {
				sum, chunks, err := verifyFile(r, v, name, e.Size)
				if err != nil {
					return err
				}
				rec.SHA256, rec.Chunks = sum, chunks
			}
		}
		if err := printJSON(out, rec); err != nil {
			return err
		}
		count++
	}
	return printJSON(out, verifySummary{TOCDigest: r.TOCDigest().String(), Entries: count})
}

func recordFrom(e *estargz.TOCEntry, name string) entryRecord {
	x := e.Xattrs
	if x == nil {
		x = map[string][]byte{} // always emit an object, never null
	}
	return entryRecord{
		Name:      name,
		Type:      e.Type,
		Size:      e.Size,
		Mode:      e.Mode,
		UID:       e.UID,
		GID:       e.GID,
		UserName:  e.Uname,
		GroupName: e.Gname,
		LinkName:  e.LinkName,
		DevMajor:  e.DevMajor,
		DevMinor:  e.DevMinor,
		Xattrs:    x,
	}
}

// verifyFile reads a regular file chunk by chunk through the Reader, checks
// each chunk against its digest from the TOCEntryVerifier, and returns the
// sha256 of the whole content plus the number of chunks seen.
//
// Reading per chunk (rather than the whole file at once) matters: the
// verifier digests are per chunk, and it is also how the snapshotter reads
// lazily, so a broken ChunkOffset/ChunkSize/Offset shows up here.
func verifyFile(r *estargz.Reader, v estargz.TOCEntryVerifier, name string, size int64) (string, int, error) {
	fr, err := r.OpenFile(name)
	if err != nil {
		return "", 0, fmt.Errorf("OpenFile(%q): %v", name, err)
	}
	whole := sha256.New()
	chunks := 0
	var buf []byte
	// An empty file has no chunk at all: its ChunkSize stays 0, so
	// ChunkEntryForOffset(name, 0) reports "no chunk" and the loop never runs.
	for off := int64(0); off < size; {
		ce, ok := r.ChunkEntryForOffset(name, off)
		if !ok {
			return "", 0, fmt.Errorf("%q: no chunk entry for offset %d", name, off)
		}
		// Chunks must tile the file exactly, or we'd silently skip or re-read
		// bytes; ChunkSize 0 would also loop forever.
		if ce.ChunkOffset != off || ce.ChunkSize <= 0 || ce.ChunkOffset+ce.ChunkSize > size {
			return "", 0, fmt.Errorf("%q: bad chunk at offset %d (chunkOffset=%d chunkSize=%d size=%d)",
				name, off, ce.ChunkOffset, ce.ChunkSize, size)
		}
		dv, err := v.Verifier(ce)
		if err != nil {
			return "", 0, fmt.Errorf("%q: chunk at offset %d: %v", name, off, err)
		}
		if int64(cap(buf)) < ce.ChunkSize {
			buf = make([]byte, ce.ChunkSize)
		}
		b := buf[:ce.ChunkSize]
		n, err := fr.ReadAt(b, ce.ChunkOffset)
		// ReadAt may legitimately return io.EOF together with a full read
		// when the chunk ends exactly at the end of the file.
		if int64(n) != ce.ChunkSize || (err != nil && err != io.EOF) {
			return "", 0, fmt.Errorf("%q: reading chunk at offset %d: got %d of %d bytes: %v",
				name, off, n, ce.ChunkSize, err)
		}
		if _, err := dv.Write(b); err != nil {
			return "", 0, err
		}
		if !dv.Verified() {
			return "", 0, fmt.Errorf("%q: chunk at offset %d (size %d) failed digest verification",
				name, off, ce.ChunkSize)
		}
		whole.Write(b)
		chunks++
		off += ce.ChunkSize
	}
	return hex.EncodeToString(whole.Sum(nil)), chunks, nil
}

// readRawTOC decodes the TOC JSON with the package's gzip decompressor. The
// TOC lives between the offset recorded in the footer and the footer itself.
func readRawTOC(sr *io.SectionReader) (*estargz.JTOC, error) {
	tocOff, footerSize, err := estargz.OpenFooter(sr)
	if err != nil {
		return nil, fmt.Errorf("OpenFooter: %v", err)
	}
	end := sr.Size() - footerSize
	if tocOff < 0 || tocOff > end {
		return nil, fmt.Errorf("TOC offset %d outside blob (payload ends at %d)", tocOff, end)
	}
	b := make([]byte, end-tocOff)
	if _, err := sr.ReadAt(b, tocOff); err != nil {
		return nil, fmt.Errorf("reading TOC: %v", err)
	}
	toc, _, err := new(estargz.GzipDecompressor).ParseTOC(bytes.NewReader(b))
	if err != nil {
		return nil, fmt.Errorf("parsing TOC: %v", err)
	}
	return toc, nil
}

// cleanName normalises an entry name the same way the package does
// internally (its helper is unexported): a path relative to the root, with
// "./", "/", "..", duplicate slashes and trailing slashes removed. The root
// itself becomes "".
func cleanName(name string) string {
	return strings.TrimPrefix(path.Clean("/"+name), "/")
}

// parseTime parses a TOC modtime the way Reader.initFields does: RFC 3339,
// and anything unparsable silently becomes the zero time.
func parseTime(s string) time.Time {
	t, _ := time.Parse(time.RFC3339, s)
	return t
}

// formatTime renders a modtime as RFC 3339 in UTC, or "" for the zero time
// (the writer omits modtime for zero and Unix-epoch times).
func formatTime(t time.Time) string {
	if t.IsZero() {
		return ""
	}
	return t.UTC().Format(time.RFC3339)
}
