"""Proof against the reference implementation, both ways.

Our blobs are opened by the reference Go reader (through tests/interop/goref):
``VerifyTOC`` with the TOC digest we report, then every file read chunk by
chunk through its verifier and compared with the input. Blobs made by the
reference ``estargz.Build`` must pass our ``verify``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

import estargz
from conftest import CHUNK, Spec, build_tar, every_kind_specs, member_data, pattern, run_cli, write
from estargz import clean_name
from estargz.cli.base import MIN_CHUNK_SIZE
from estargz.layer.units import format_modtime

_KIND = {tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hardlink",
         tarfile.CHRTYPE: "char", tarfile.BLKTYPE: "block", tarfile.FIFOTYPE: "fifo"}


def expected_entries(tar_path: Path) -> dict[str, dict]:
    """What the reference should report for each entry of the input tar."""
    out = {}
    with tarfile.open(tar_path) as tf:
        for m in tf:
            name = clean_name(m.name)
            rec = {"type": _KIND.get(m.type, "reg"), "mode": m.mode & 0o7777,
                   "uid": m.uid, "gid": m.gid, "modtime": format_modtime(m.mtime),
                   "xattrs": {k[13:]: base64.b64encode(
                                  v.encode("utf-8", "surrogateescape")).decode()
                              for k, v in m.pax_headers.items() if k.startswith("SCHILY.xattr.")}}
            if m.isreg():
                rec["size"] = m.size
                rec["sha256"] = hashlib.sha256(member_data(tf, m)).hexdigest()
            if m.issym() or m.islnk():
                rec["linkName"] = m.linkname
            if m.ischr() or m.isblk():
                rec["devMajor"], rec["devMinor"] = m.devmajor, m.devminor
            out[name] = rec  # a repeated name: the later entry wins
    return out


def reference_reads(goref: Path, blob: Path, toc_digest: str) -> dict[str, dict]:
    p = subprocess.run([goref, "verify", blob, toc_digest], capture_output=True, text=True)
    assert p.returncode == 0, f"reference rejected our blob: {p.stderr}"
    lines = [json.loads(item) for item in p.stdout.splitlines()]
    summary = lines.pop()
    assert summary["tocDigest"] == toc_digest
    return {r["name"]: r for r in lines}


def assert_reference_reads_input(goref: Path, tar_path: Path, blob: Path, toc_digest: str,
                                 landmark: str) -> None:
    got = reference_reads(goref, blob, toc_digest)
    assert got.pop(landmark)["sha256"] == hashlib.sha256(b"\x0f").hexdigest()
    want = expected_entries(tar_path)
    assert set(got) == set(want)
    for name, rec in want.items():
        assert {k: got[name][k] for k in rec} == rec, name


def convert_both(tmp_path: Path, tar: bytes, *args: str) -> tuple[Path, Path, dict]:
    src = write(tmp_path / "in.tar", tar)
    out = tmp_path / "out.esgz"
    r = run_cli("layer", "convert", src, out, "--json", *args)
    assert r.code == 0, r.err
    return src, out, r.json()


CASES = {
    "every-kind": (every_kind_specs(), ["--chunk-size", str(CHUNK)]),
    "one-byte-chunks": ([Spec("d/", tarfile.DIRTYPE), Spec("d/f", data=pattern(300)),
                         Spec("d/one", data=b"1")], ["--chunk-size", "1"]),
    "empty-layer": ([], []),
    "many-files": ([Spec(f"m/{i:03d}", data=pattern(i * 51, i)) for i in range(150)]
                   + [Spec("big", data=pattern(300_000, 9))], []),
}


@pytest.mark.parametrize("case", CASES)
def test_reference_reads_our_blob(tmp_path, goref, case):
    specs, args = CASES[case]
    if args[:1] == ["--chunk-size"] and int(args[1]) < MIN_CHUNK_SIZE:
        # Below the CLI's floor: the library still takes it.
        src = write(tmp_path / "in.tar", build_tar(specs))
        out = tmp_path / "out.esgz"
        result = estargz.convert_layer(str(src), str(out), estargz.ConvertOptions(
            chunk_size=int(args[1]))).to_dict()
    else:
        src, out, result = convert_both(tmp_path, build_tar(specs), *args)
    assert_reference_reads_input(goref, src, out, result["toc_digest"],
                                 ".no.prefetch.landmark")


def sparse_tar(tmp_path: Path, fmt: str) -> bytes:
    root = tmp_path / "sparse-root"
    root.mkdir(exist_ok=True)
    with open(root / "holes", "wb") as f:
        f.write(b"start")
        f.seek(200_000)
        f.write(b"end")
    tar = tmp_path / "sparse.tar"
    subprocess.run(["tar", "--sparse", f"--format={fmt}", "-C", root, "-cf", tar, "holes"],
                   check=True)
    return tar.read_bytes()


@pytest.mark.parametrize("case", ["gnu-long-names", "pax-global", "repeated-names",
                                  "sparse-gnu", "sparse-pax", "estargz-input"])
def test_reference_reads_our_conversion_of_unusual_tars(tmp_path, goref, case):
    specs = every_kind_specs()
    if case == "gnu-long-names":
        tar = build_tar(specs, fmt=tarfile.GNU_FORMAT)
    elif case == "pax-global":
        tar = build_tar(specs, pax_global={"comment": "made by git archive"})
    elif case == "repeated-names":
        tar = build_tar(specs + [Spec("etc/small", data=b"replaced"),
                                 Spec("etc/symlink", tarfile.SYMTYPE, linkname="exact")])
    elif case.startswith("sparse"):
        tar = sparse_tar(tmp_path, "gnu" if case == "sparse-gnu" else "posix")
    else:
        _, first, _ = convert_both(tmp_path, build_tar(specs), "--chunk-size", str(CHUNK))
        tar = first.read_bytes()
    src, out, result = convert_both(tmp_path, tar, "--chunk-size", str(CHUNK))
    if case == "estargz-input":
        # The input's own TOC and landmark are replaced, not carried as files.
        src = write(tmp_path / "orig.tar", build_tar(specs))
    assert_reference_reads_input(goref, src, out, result["toc_digest"],
                                 ".no.prefetch.landmark")


def test_reference_reads_prioritized_nested_hardlinked_and_symlinked(tmp_path, goref):
    specs = every_kind_specs() + [
        Spec("usr/", tarfile.DIRTYPE), Spec("usr/bin/", tarfile.DIRTYPE),
        Spec("bin", tarfile.SYMTYPE, linkname="usr/bin"),
        Spec("usr/bin/dash", data=pattern(4000)),
        Spec("usr/bin/sh", tarfile.SYMTYPE, linkname="dash")]
    plist = write(tmp_path / "list", "\n".join([
        "bin/sh", "/etc/hardlink", "./" + every_kind_specs()[14].name, "etc/larger",
        "missing/file"]).encode())
    src, out, result = convert_both(tmp_path, build_tar(specs), "--chunk-size", str(CHUNK),
                                    "--prioritized-files", str(plist), "--allow-missing")
    assert result["missing"] == ["missing/file"]
    assert_reference_reads_input(goref, src, out, result["toc_digest"], ".prefetch.landmark")
    toc = json.loads(run_cli("layer", "toc", out, check=True).out)
    names = [clean_name(e["name"]) for e in toc["entries"] if e["type"] != "chunk"]
    landmark = names.index(".prefetch.landmark")
    for needed in ("bin", "usr/bin/sh", "usr/bin/dash", "etc/small", "etc/hardlink",
                   "etc/larger", clean_name(every_kind_specs()[14].name)):
        assert names.index(needed) < landmark, needed


def test_reference_reads_our_debian_rootfs_layer(tmp_path, goref, debian_layer):
    plist = write(tmp_path / "list", b"bin/sh\nusr/bin/bash\netc/os-release\nusr/lib/os-release\n")
    out = tmp_path / "debian.esgz"
    r = run_cli("layer", "convert", debian_layer, out, "--json", "--prioritized-files", plist)
    assert r.code == 0, r.err
    assert_reference_reads_input(goref, debian_layer, out, r.json()["toc_digest"],
                                 ".prefetch.landmark")


def reference_build(goref: Path, src: Path, out: Path, *args: str) -> dict:
    env = {**os.environ, "GOMAXPROCS": "2"}
    p = subprocess.run([goref, "build", src, out, *args], capture_output=True, text=True,
                       env=env)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.splitlines()[-1])


@pytest.mark.parametrize("case", CASES)
def test_we_verify_reference_blobs(tmp_path, goref, case):
    specs, args = CASES[case]
    src = write(tmp_path / "in.tar", build_tar(specs, fmt=tarfile.GNU_FORMAT))
    out = tmp_path / "ref.esgz"
    built = reference_build(goref, src, out, *args)
    r = run_cli("layer", "verify", out, "--toc-digest", built["tocDigest"], "--json")
    assert r.code == 0, r.err
    assert r.json()["toc_digest"] == built["tocDigest"]
    # And our reader extracts every file the reference wrote, verified.
    want = expected_entries(src)
    with estargz.FileSource(str(out)) as source:
        reader = estargz.LayerReader(source)
        for name, rec in want.items():
            if rec["type"] == "reg":
                data = b"".join(reader.iter_file(name))
                assert hashlib.sha256(data).hexdigest() == rec["sha256"], name


def test_we_verify_reference_blob_with_prioritized_files(tmp_path, goref):
    src = write(tmp_path / "in.tar", build_tar(every_kind_specs(), fmt=tarfile.GNU_FORMAT))
    plist = write(tmp_path / "list", b"etc/hardlink\ndev/null\netc/larger\n")
    out = tmp_path / "ref.esgz"
    built = reference_build(goref, src, out, "--chunk-size", str(CHUNK), "--prioritized",
                            str(plist))
    r = run_cli("layer", "verify", out, "--toc-digest", built["tocDigest"])
    assert r.code == 0, r.err


def test_we_verify_reference_debian_rootfs_blob(tmp_path, goref, debian_layer):
    out = tmp_path / "ref.esgz"
    built = reference_build(goref, debian_layer, out)
    r = run_cli("layer", "verify", out, "--toc-digest", built["tocDigest"], "--json")
    assert r.code == 0, r.err
    assert r.json()["entries"] > 6000


def test_our_footer_is_byte_identical_to_the_reference(tmp_path, goref):
    src = write(tmp_path / "in.tar", build_tar([Spec("a", data=b"abc")]))
    out = tmp_path / "ref.esgz"
    reference_build(goref, src, out)
    blob = out.read_bytes()
    toc_offset, size = estargz.parse_footer(blob[-51:])
    assert size == 51
    assert estargz.footer_bytes(toc_offset) == blob[-51:]
