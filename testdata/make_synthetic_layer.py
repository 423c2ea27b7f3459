#!/usr/bin/env python3
"""Deterministic generator of synthetic, uncompressed container-layer tars.

    make_synthetic_layer.py OUT [--size-mib N] [--files N] [--seed S]
                                [--shape {mixed,many-small,one-large}]

Shapes (N MiB is the sum of the regular files' contents, exactly):

  mixed (default; --size-mib 1024, --files 8 per MiB)
      Many small files (log-uniform 200 B .. 64 KiB; ~70 % text-like and
      compressible, ~30 % random and incompressible, a few empty) in a nested
      directory tree, plus a few large files (about one per 160 MiB; tens to
      hundreds of MiB each) made of segments that are text-like, random,
      a repeated short block, or zeros.  Also a few symlinks, hardlinks and
      paths longer than 100 bytes (PAX "path" records).  --files counts the
      regular files (small + large).
  many-small (--size-mib 2048, --files 50000)
      --files files of similar size (size-mib / files on average, +-75 %),
      about 100 per directory.  Half text-like, half random.
  one-large (--size-mib 2048)
      A single file (data/large.bin) with the segment mix of the large files
      above.  --files is not accepted.

Output is byte-identical for the same arguments (and the same Python 3
minor series; the generator only uses random.Random seeded with integers):
entries are sorted by name the way GNU tar --sort=name does (depth first,
bytewise within each directory), mtime is fixed, uid/gid 0 and uname/gname
"root".  Headers come from tarfile.TarInfo.tobuf(PAX_FORMAT): plain USTAR
headers, with a PAX extended header only where USTAR can't hold a field
(long names).  File contents are produced on demand by a file object whose
read() generates the next bytes, so memory use stays small whatever the size.

The tar is written to OUT.tmp-<pid> and renamed to OUT; on success the only
output is OUT's path on stdout.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tarfile
from dataclasses import dataclass, field
from typing import Callable, Iterator

MiB = 1 << 20
KiB = 1 << 10
PIECE = 1 * MiB          # largest bytes object a content generator yields
MTIME = 1704067200       # 2024-01-01T00:00:00Z
RECORDSIZE = tarfile.RECORDSIZE
BLOCKSIZE = tarfile.BLOCKSIZE

# --------------------------------------------------------------------------
# Content


class GeneratedFile:
    """Read-only file object of a known size whose bytes are produced on read().

    `pieces` yields bytes objects (each at most PIECE long) that together are
    at least `size` bytes; anything beyond `size` is discarded.
    """

    def __init__(self, size: int, pieces: Iterator[bytes]):
        self.size = size
        self._left = size
        self._pieces = pieces
        self._buf = memoryview(b"")

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self._left
        n = min(n, self._left)
        out = []
        want = n
        while want:
            if not self._buf:
                try:
                    self._buf = memoryview(next(self._pieces))
                except StopIteration:
                    raise ValueError("content generator ran dry") from None
                continue
            take = self._buf[:want]
            out.append(bytes(take))
            self._buf = self._buf[len(take):]
            want -= len(take)
        self._left -= n
        return b"".join(out)

    def readable(self) -> bool:
        return True


def _make_words(rng: random.Random, count: int) -> list[str]:
    consonants = "bcdfghjklmnprstvwz"
    vowels = "aeiou"
    words: set[str] = set()
    while len(words) < count:
        syl = rng.randint(1, 4)
        words.add("".join(rng.choice(consonants) + rng.choice(vowels)
                          + (rng.choice("nrstl") if rng.random() < 0.3 else "")
                          for _ in range(syl)))
    out = sorted(words)
    rng.shuffle(out)   # Zipf rank must not follow the alphabet
    return out


class TextPool:
    """A few MiB of text-like bytes (log lines, code, prose) to slice from.

    Words follow a Zipf-like distribution, so the text compresses roughly
    like real text (gzip ~3x).
    """

    def __init__(self, seed: int, size: int = 8 * MiB):
        rng = random.Random(seed)
        self.words = _make_words(rng, 3000)
        cum, total = [], 0.0
        for i in range(len(self.words)):
            total += 1.0 / (i + 1)
            cum.append(total)
        self._cum = cum
        parts: list[str] = []
        n = 0
        levels = ["INFO", "INFO", "INFO", "DEBUG", "WARN", "ERROR"]
        while n < size:
            w = rng.choices(self.words, cum_weights=cum, k=24)
            kind = rng.random()
            if kind < 0.35:
                line = (f"2024-01-01T{rng.randrange(24):02d}:{rng.randrange(60):02d}:"
                        f"{rng.randrange(60):02d}.{rng.randrange(10**6):06d}Z "
                        f"{rng.choice(levels)} {w[0]}.{w[1]}: {' '.join(w[2:8])} "
                        f"{w[8]}={rng.randrange(100000)} {w[9]}={w[10]}\n")
            elif kind < 0.7:
                ind = "    " * rng.randrange(4)
                line = (f"{ind}def {w[0]}_{w[1]}(self, {w[2]}, {w[3]}={rng.randrange(100)}):\n"
                        f"{ind}    {w[4]} = self.{w[5]}({w[2]}, \"{w[6]} {w[7]}\")\n"
                        f"{ind}    return {w[4]} + {w[3]}\n\n")
            else:
                line = " ".join(w[:rng.randint(6, 24)]).capitalize() + ".\n"
            parts.append(line)
            n += len(line)
        self.data = "".join(parts).encode()
        self.size = len(self.data)

    def slices(self, rng: random.Random, n: int) -> Iterator[bytes]:
        """Yield n bytes (in pieces <= PIECE) cut from random pool offsets."""
        while n > 0:
            take = min(n, PIECE, rng.randint(4 * KiB, PIECE))
            off = rng.randrange(self.size - take + 1)
            yield self.data[off:off + take]
            n -= take

    def word(self, rng: random.Random) -> str:
        return rng.choices(self.words, cum_weights=self._cum)[0]


def random_bytes(rng: random.Random, n: int) -> Iterator[bytes]:
    while n > 0:
        take = min(n, PIECE)
        yield rng.randbytes(take)
        n -= take


def small_content(pool: TextPool, rng: random.Random, size: int,
                  random_share: float) -> Iterator[bytes]:
    if rng.random() < random_share:
        return random_bytes(rng, size)
    return pool.slices(rng, size)


def large_content(pool: TextPool, rng: random.Random, size: int) -> Iterator[bytes]:
    """Partly compressible: segments of text, random, repeated block, zeros."""
    zeros = bytes(PIECE)
    left = size
    while left > 0:
        seg = min(left, rng.randint(256 * KiB, 8 * MiB))
        left -= seg
        kind = rng.random()
        if kind < 0.40:
            yield from pool.slices(rng, seg)
        elif kind < 0.75:
            yield from random_bytes(rng, seg)
        elif kind < 0.90:
            block = rng.randbytes(rng.choice((512, 4 * KiB, 16 * KiB)))
            piece = block * (PIECE // len(block))
            while seg > 0:
                take = min(seg, PIECE)
                yield piece[:take]
                seg -= take
        else:
            while seg > 0:
                take = min(seg, PIECE)
                yield zeros[:take]
                seg -= take


# --------------------------------------------------------------------------
# Layout


@dataclass
class Entry:
    name: str
    kind: str                      # "dir", "file", "symlink", "hardlink"
    size: int = 0
    mode: int = 0o644
    linkname: str = ""
    content: Callable[[], Iterator[bytes]] | None = None
    key: tuple = field(default=(), repr=False)


def split_sizes(rng: random.Random, total: int, n: int,
                lo: float, hi: float) -> list[int]:
    """n non-negative sizes summing exactly to total, each ~ U(lo, hi) * mean."""
    if n <= 0:
        return []
    weights = [rng.uniform(lo, hi) for _ in range(n)]
    wsum = sum(weights)
    sizes = [int(total * w / wsum) for w in weights]
    sizes[-1] += total - sum(sizes)
    return sizes


def make_dirs(rng: random.Random, pool: TextPool, roots: list[str],
              count: int) -> list[str]:
    """Grow a random tree of `count` directories below `roots`."""
    dirs = list(roots)
    seen = set(dirs)
    while len(dirs) < len(roots) + count:
        parent = dirs[rng.randrange(len(dirs))]
        if parent.count("/") >= 7:
            continue
        name = f"{parent}/{pool.word(rng)}"
        if rng.random() < 0.2:
            name += f"-{rng.randrange(1000)}"
        if name not in seen:
            seen.add(name)
            dirs.append(name)
    return dirs


TEXT_EXT = ["py", "txt", "json", "c", "h", "md", "conf", "html", "js", "yaml"]
BIN_EXT = ["so", "bin", "gz", "png", "jpg", "zst", "pyc", "mo"]


def layout_mixed(seed: int, total: int, files: int, pool: TextPool) -> list[Entry]:
    rng = random.Random(seed * 7919 + 1)
    n_large = min(files, max(1, round(total / (160 * MiB))))
    n_small = files - n_large

    # Small files: log-uniform sizes, a few empty; at most half the budget.
    small_sizes = []
    for i in range(n_small):
        if rng.random() < 0.005:
            small_sizes.append(0)
        else:
            small_sizes.append(int(200 * (64 * KiB / 200) ** rng.random()))
    budget = total // 2 if n_large else total
    ssum = sum(small_sizes)
    if ssum > budget:
        small_sizes = [s * budget // ssum for s in small_sizes]
        ssum = sum(small_sizes)
    if n_large == 0 and small_sizes:
        small_sizes[-1] += total - ssum
        ssum = total
    large_sizes = split_sizes(rng, total - ssum, n_large, 0.2, 1.8)

    roots = ["etc/app", "opt/app", "srv/data", "usr/lib/app", "usr/share/app",
             "var/lib/app"]
    dirs = make_dirs(rng, pool, roots, max(4, files // 25))
    entries: list[Entry] = []
    used: set[str] = set()

    def unique(path: str) -> str:
        base, i = path, 1
        while path in used:
            stem, dot, ext = base.rpartition(".")
            path = f"{stem}-{i}.{ext}" if dot else f"{base}-{i}"
            i += 1
        used.add(path)
        return path

    # The first small file goes to a path well beyond USTAR's 100-byte name
    # field (and its 155-byte prefix), so it needs a PAX "path" record.
    deep = "usr/share/app/" + "/".join(
        f"{pool.word(rng)}-{'x' * 20}-{k}" for k in range(10))

    file_names: list[str] = []
    for i, size in enumerate(small_sizes):
        is_random = rng.random() < 0.3
        ext = rng.choice(BIN_EXT if is_random else TEXT_EXT)
        if i == 0:
            name = unique(f"{deep}/{'long-file-name-' * 8}{ext}.{ext}")
        else:
            name = unique(f"{rng.choice(dirs)}/{pool.word(rng)}_{pool.word(rng)}.{ext}")
        frng_seed = seed * 1_000_003 + i
        share = 1.0 if is_random else 0.0

        def content(frng_seed=frng_seed, size=size, share=share):
            return small_content(pool, random.Random(frng_seed), size, share)
        mode = 0o755 if ext in ("so", "bin") and rng.random() < 0.5 else 0o644
        entries.append(Entry(name, "file", size, mode, content=content))
        file_names.append(name)

    for j, size in enumerate(large_sizes):
        name = unique(f"{rng.choice(['srv/data', 'var/lib/app', 'opt/app'])}/"
                      f"blob-{j:02d}-{pool.word(rng)}.dat")
        frng_seed = seed * 1_000_003 + n_small + j

        def content(frng_seed=frng_seed, size=size):
            return large_content(pool, random.Random(frng_seed), size)
        entries.append(Entry(name, "file", size, 0o644, content=content))
        file_names.append(name)

    # Symlinks (relative, absolute, dangling) and hardlinks (~1 % each).
    n_links = max(1, files // 100) if file_names else 0
    for k in range(n_links):
        d = rng.choice(dirs)
        r = rng.random()
        if r < 0.6:
            target = os.path.relpath(rng.choice(file_names), d)
        elif r < 0.8:
            target = "/" + rng.choice(file_names)
        else:
            target = f"../missing-{k}"
        entries.append(Entry(unique(f"{d}/link-{k}"), "symlink", 0, 0o777,
                             linkname=target))
        entries.append(Entry(unique(f"{rng.choice(dirs)}/hardlink-{k}"), "hardlink",
                             0, 0o644))

    return finish(entries, rng)


def layout_many_small(seed: int, total: int, files: int, pool: TextPool) -> list[Entry]:
    rng = random.Random(seed * 7919 + 2)
    sizes = split_sizes(rng, total, files, 0.25, 1.75)
    dirs = make_dirs(rng, pool, ["data"], max(1, files // 100))
    entries = []
    for i, size in enumerate(sizes):
        name = f"{rng.choice(dirs)}/f{i:07d}.dat"
        fs = seed * 1_000_003 + i

        def content(fs=fs, size=size):
            return small_content(pool, random.Random(fs), size, 0.5)
        entries.append(Entry(name, "file", size, 0o644, content=content))
    return finish(entries, rng)


def layout_one_large(seed: int, total: int, pool: TextPool) -> list[Entry]:
    rng = random.Random(seed * 7919 + 3)
    fs = seed * 1_000_003
    entries = [Entry("data/large.bin", "file", total, 0o644,
                     content=lambda: large_content(pool, random.Random(fs), total))]
    return finish(entries, rng)


def sort_key(path: str) -> tuple:
    # Depth-first, bytewise per component: like GNU tar --sort=name.
    return tuple(c.encode("utf-8", "surrogateescape") for c in path.split("/"))


def finish(entries: list[Entry], rng: random.Random) -> list[Entry]:
    """Add parent directories, sort, and point hardlinks at earlier files."""
    names = {e.name for e in entries}
    for e in list(entries):
        parts = e.name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in names:
                names.add(d)
                entries.append(Entry(d, "dir", 0, 0o755))
    for e in entries:
        e.key = sort_key(e.name)
    entries.sort(key=lambda e: e.key)
    # A hardlink must follow its target in the archive.
    regular: list[str] = []
    out = []
    for e in entries:
        if e.kind == "hardlink":
            if not regular:
                continue
            e.linkname = regular[rng.randrange(len(regular))]
        elif e.kind == "file":
            regular.append(e.name)
        out.append(e)
    return out


# --------------------------------------------------------------------------
# Writing

TYPES = {"dir": tarfile.DIRTYPE, "file": tarfile.REGTYPE,
         "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE}


def write_tar(path: str, entries: list[Entry]) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb", buffering=4 * MiB) as out:
            written = 0
            for e in entries:
                ti = tarfile.TarInfo(e.name + ("/" if e.kind == "dir" else ""))
                ti.type = TYPES[e.kind]
                ti.mode = e.mode
                ti.mtime = MTIME
                ti.uid = ti.gid = 0
                ti.uname = ti.gname = "root"
                ti.linkname = e.linkname
                ti.size = e.size if e.kind == "file" else 0
                hdr = ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
                out.write(hdr)
                written += len(hdr)
                if ti.size:
                    src = GeneratedFile(ti.size, e.content())
                    while True:
                        buf = src.read(PIECE)
                        if not buf:
                            break
                        out.write(buf)
                    pad = -ti.size % BLOCKSIZE
                    out.write(bytes(pad))
                    written += ti.size + pad
            # End of archive as tarfile.TarFile.close() writes it.
            trailer = 2 * BLOCKSIZE
            trailer += -(written + trailer) % RECORDSIZE
            out.write(bytes(trailer))
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Write a deterministic synthetic uncompressed layer tar.",
        epilog="See the module docstring / testdata/README.md for the shapes.")
    p.add_argument("out", metavar="OUT", help="output tar path")
    p.add_argument("--shape", choices=("mixed", "many-small", "one-large"),
                   default="mixed")
    p.add_argument("--size-mib", type=int, default=None,
                   help="total file content in MiB (mixed: 1024, others: 2048)")
    p.add_argument("--files", type=int, default=None,
                   help="number of regular files (mixed: 8 per MiB, "
                        "many-small: 50000)")
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args(argv)

    size_mib = a.size_mib if a.size_mib is not None else (
        1024 if a.shape == "mixed" else 2048)
    if size_mib <= 0:
        p.error("--size-mib must be positive")
    if a.files is not None and a.files <= 0:
        p.error("--files must be positive")
    if a.seed < 0:
        p.error("--seed must be >= 0")
    total = size_mib * MiB

    pool = TextPool(a.seed)
    if a.shape == "mixed":
        files = a.files if a.files is not None else max(16, 8 * size_mib)
        entries = layout_mixed(a.seed, total, files, pool)
    elif a.shape == "many-small":
        files = a.files if a.files is not None else 50000
        entries = layout_many_small(a.seed, total, files, pool)
    else:
        if a.files not in (None, 1):
            p.error("--shape one-large writes exactly one file; drop --files")
        entries = layout_one_large(a.seed, total, pool)

    write_tar(a.out, entries)
    print(a.out)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
