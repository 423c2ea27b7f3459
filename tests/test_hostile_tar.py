"""Hostile tar headers in an input layer are refused before anything is written.

Every numeric field (size, mtime, uid, gid, mode, device numbers) in every
encoding tar has for it -- ustar octal text, GNU base-256, PAX records -- and
every name (ustar name and prefix, GNU long names, PAX path and linkpath)
is checked once, in the one tar walk (``estargz.layer.tarstream``), so
``layer convert``, image conversion, ``verify`` and optimize's extraction
refuse the same headers with the same message. Refused means exit 1 and one
``estargz: error:`` line naming the header's offset and the field, no
traceback, and the output path not created (or left as it was).

What is accepted is exactly what our own ``verify`` accepts afterwards: the
tests at the edges of each range convert and verify.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import write
from estargz import BytesSource, ConvertOptions, InvalidInput, convert_layer, verify_blob
from estargz.cli import main
from estargz.layer.tarstream import MAX_ID, MAX_TIME, MIN_TIME
from profiler.rootfs import extract_layer

BLOCK = 512
FIELDS = {"mode": (100, 8), "uid": (108, 8), "gid": (116, 8), "size": (124, 12),
          "mtime": (136, 12), "devmajor": (329, 8), "devminor": (337, 8)}


def one_file_tar(name: str = "f", data: bytes = b"hello\n", fmt: int = tarfile.USTAR_FORMAT,
                 **attrs: object) -> bytes:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    ti.mode = 0o644
    ti.mtime = 1_600_000_000
    for k, v in attrs.items():
        setattr(ti, k, v)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def patch_field(tar: bytes, at: int, start: int, raw: bytes) -> bytes:
    """``tar`` with the header block at ``at`` holding ``raw`` at ``start``,
    its checksum recomputed (so only the field is wrong)."""
    block = bytearray(tar[at:at + BLOCK])
    block[start:start + len(raw)] = raw
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return tar[:at] + bytes(block) + tar[at + BLOCK:]


def field(name: str, raw: bytes) -> bytes:
    """A one-file ustar tar whose ``name`` field holds ``raw`` (padded with NULs)."""
    start, width = FIELDS[name]
    return patch_field(one_file_tar(), 0, start, raw.ljust(width, b"\0"))


def base256(value: int, width: int) -> bytes:
    """GNU base-256: 0x80 then big-endian magnitude; 0xff and two's
    complement for a negative value."""
    if value >= 0:
        return b"\x80" + value.to_bytes(width - 1, "big")
    return b"\xff" + (value % (256 ** (width - 1))).to_bytes(width - 1, "big")


def pax_tar(records: dict[str, str], name: str = "f") -> bytes:
    """A one-file tar preceded by a PAX header holding exactly ``records``."""
    pax = tarfile.TarInfo()._create_pax_generic_header(  # type: ignore[attr-defined]
        records, tarfile.XHDTYPE, "utf-8")
    return pax + one_file_tar(name)


# (id, tar bytes, fragment of the one-line message)
OCTAL = [
    ("uid-negative-text", field("uid", b"-000005"), "uid field '-000005' is not an octal"),
    ("uid-plus-sign", field("uid", b"+000005"), "is not an octal number"),
    ("uid-underscore", field("uid", b"00_0005"), "is not an octal number"),
    ("uid-junk-after-nul", field("uid", b"0005\0x"), "uid field '0005\\x00x' is not an octal"),
    ("size-non-numeric", field("size", b"abc"), "invalid tar header"),
    ("mtime-digit-nine", field("mtime", b"99999999999"), "invalid tar header"),
    ("mode-above-type-bits", field("mode", b"0200000"), "mode 65536 is outside 0 to 65535"),
    ("mode-all-digits", field("mode", b"7777777"), "mode 2097151 is outside"),
]
BASE256 = [
    ("size-negative", field("size", base256(-1, 12)), "size -1 is outside"),
    ("size-2**87", field("size", base256(2**87, 12)), f"size {2**87} is outside"),
    ("uid-negative", field("uid", base256(-5, 8)), "uid -5 is outside 0 to 4294967294"),
    ("uid-2**32-1", field("uid", base256(2**32 - 1, 8)), "uid 4294967295 is outside"),
    ("gid-2**40", field("gid", base256(2**40, 8)), "gid 1099511627776 is outside"),
    ("mode-2**40", field("mode", base256(2**40, 8)), "mode 1099511627776 is outside"),
    ("mode-negative", field("mode", base256(-1, 8)), "mode -1 is outside"),
    ("mtime-year-10000", field("mtime", base256(MAX_TIME + 1, 12)), "mtime 253402300800"),
    ("mtime-year-minus-1", field("mtime", base256(MIN_TIME - 1, 12)), "outside years 0000"),
    ("mtime-2**87", field("mtime", base256(2**87, 12)), "outside years 0000 to 9999"),
    ("devmajor-2**21", field("devmajor", base256(2**21, 8)), "devmajor 2097152 is outside"),
    ("devminor-negative", field("devminor", base256(-1, 8)), "devminor -1 is outside"),
]
PAX = [
    ("size=-1", pax_tar({"size": "-1"}), "PAX size '-1' is not a non-negative integer"),
    ("size=1e400", pax_tar({"size": "1e400"}), "PAX size '1e400' is not a non-negative"),
    ("size=abc", pax_tar({"size": "abc"}), "PAX size 'abc' is not a non-negative integer"),
    ("size=empty", pax_tar({"size": ""}), "PAX size '' is not a non-negative integer"),
    ("size=1_0", pax_tar({"size": "1_0"}), "PAX size '1_0' is not"),
    ("size=fullwidth", pax_tar({"size": "\uff11"}), "is not a non-negative integer"),
    ("size=2**63", pax_tar({"size": str(2**63)}), f"size {2**63} is outside"),
    ("size=5000-digits", pax_tar({"size": "9" * 5000}), "PAX size 99999"),
    ("uid=20-digits", pax_tar({"uid": "99999999999999999999"}), "PAX uid 9999"),
    ("uid=-5", pax_tar({"uid": "-5"}), "PAX uid '-5' is not a non-negative integer"),
    ("uid=2**32-1", pax_tar({"uid": str(2**32 - 1)}), "uid 4294967295 is outside"),
    ("gid=abc", pax_tar({"gid": "abc"}), "PAX gid 'abc'"),
    ("mtime=nan", pax_tar({"mtime": "nan"}), "PAX mtime 'nan' is not a time in seconds"),
    ("mtime=inf", pax_tar({"mtime": "inf"}), "PAX mtime 'inf' is not a time"),
    ("mtime=1e400", pax_tar({"mtime": "1e400"}), "PAX mtime '1e400' is not a time"),
    ("mtime=year-10000", pax_tar({"mtime": str(MAX_TIME + 1)}), "outside years 0000 to 9999"),
    ("mtime=rounds-to-10000", pax_tar({"mtime": f"{MAX_TIME}.6"}), "mtime 253402300800"),
    ("mtime=30-digits", pax_tar({"mtime": "1" * 30}), "outside years 0000 to 9999"),
    ("atime=nan", pax_tar({"atime": "nan"}), "PAX atime 'nan' is not a time"),
    ("ctime=-1e30", pax_tar({"ctime": "-1e30"}), "PAX ctime '-1e30'"),
]
NAMES = [
    ("ustar-name", patch_field(one_file_tar("abc"), 0, 0, b"a\0b"), "name field holds a NUL"),
    ("ustar-prefix", patch_field(one_file_tar("p" * 20 + "/" + "n" * 99), 0, 345, b"p\0q"),
     "prefix field holds a NUL"),
    ("ustar-linkname", patch_field(one_file_tar("l", b"", type=tarfile.SYMTYPE, linkname="tgt"),
                                   0, 157, b"t\0g"), "linkname field holds a NUL"),
    ("gnu-longname", one_file_tar("x" * 150, fmt=tarfile.GNU_FORMAT).replace(
        b"x" * 150, b"x" * 70 + b"\0" + b"y" * 79), "GNU long name holds a NUL"),
    ("gnu-longlink", one_file_tar("l", b"", fmt=tarfile.GNU_FORMAT, type=tarfile.SYMTYPE,
                                  linkname="z" * 150).replace(b"z" * 150,
                                                              b"z" * 9 + b"\0" + b"w" * 140),
     "GNU long name holds a NUL"),
    ("pax-path", pax_tar({"path": "a\0b"}), "PAX path holds a NUL byte"),
    ("pax-linkpath", pax_tar({"linkpath": "a\0b"}), "PAX linkpath holds a NUL byte"),
    ("pax-uname", pax_tar({"uname": "ro\0ot"}), "PAX uname holds a NUL byte"),
    ("pax-keyword", pax_tar({"SCHILY.xattr.user.a\0b": "v"}), "PAX keyword"),
]
CASES = OCTAL + BASE256 + PAX + NAMES


@pytest.mark.parametrize("tar, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_header_is_refused_before_anything_is_written(tmp_path, tar, message):
    src = write(tmp_path / "in.tar", tar)
    dst = tmp_path / "out.esgz"
    with pytest.raises(InvalidInput, match="invalid tar header at offset 0") as e:
        convert_layer(str(src), str(dst))
    assert message in str(e.value)
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tar"]


_runner = CliRunner()


def invoke(*args: object):
    result = _runner.invoke(main, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def assert_refused(result, *fragments: str) -> None:
    lines = result.stderr.splitlines()
    assert result.exit_code == 1, (result.exit_code, result.stderr)
    assert len(lines) == 1 and lines[0].startswith("estargz: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])


@pytest.mark.parametrize("case", ["uid-negative-text", "size-negative", "mtime=nan",
                                  "size=1e400", "uid=20-digits", "gnu-longname"])
@pytest.mark.parametrize("compressed", [False, True], ids=["tar", "gzip"])
def test_cli_refuses_in_one_line_and_leaves_the_destination_as_it_was(tmp_path, case,
                                                                      compressed):
    tar = dict((c[0], c[1]) for c in CASES)[case]
    src = write(tmp_path / "in", gzip.compress(tar) if compressed else tar)
    new = tmp_path / "new.esgz"
    assert_refused(invoke("layer", "convert", src, new), "invalid tar header at offset 0")
    assert not new.exists()
    old = write(tmp_path / "old.esgz", b"the previous output")
    assert_refused(invoke("layer", "convert", src, old))
    assert old.read_bytes() == b"the previous output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "old.esgz"]


def test_a_bad_header_after_good_members_names_its_offset(tmp_path):
    first = one_file_tar("ok")[:2 * BLOCK]  # header and one data block, no end blocks
    src = write(tmp_path / "in.tar", first + field("uid", base256(-5, 8)))
    with pytest.raises(InvalidInput, match=f"invalid tar header at offset {2 * BLOCK} "
                                           r"\('f'\): uid -5 is outside"):
        convert_layer(str(src), str(tmp_path / "out"))


# The edges of each range convert, and our verify accepts the result.
EDGES = [
    ("uid=2**32-2", one_file_tar(fmt=tarfile.GNU_FORMAT, uid=MAX_ID, gid=MAX_ID)),
    ("pax-uid=2**32-2", pax_tar({"uid": str(MAX_ID), "gid": str(MAX_ID)})),
    ("mtime=9999-12-31", pax_tar({"mtime": f"{MAX_TIME}.4"})),
    ("mtime=0000-01-01", field("mtime", base256(MIN_TIME, 12))),
    ("mtime=-1", field("mtime", base256(-1, 12))),
    ("mtime=+5", pax_tar({"mtime": "+5"})),
    ("mode-with-type-bits", field("mode", b"0100644")),
    ("octal-spaces", field("uid", b"   1750 ")),
    ("devmajor=2**21-1", patch_field(one_file_tar("c", b"", type=tarfile.CHRTYPE), 0, 329,
                                     b"7777777\0")),
    ("size=0-leading-zeros", pax_tar({"size": "0006"})),
    # star's headers keep access and change times after a shorter prefix.
    ("star-times-after-the-prefix", patch_field(
        patch_field(one_file_tar(), 0, 476, b"14000000000\0" + b"14000000000\0"),
        0, 508, b"tar\0")),
]


@pytest.mark.parametrize("tar", [c[1] for c in EDGES], ids=[c[0] for c in EDGES])
def test_values_at_the_edges_convert_and_verify(tmp_path, tar):
    src = write(tmp_path / "in.tar", tar)
    dst = tmp_path / "out.esgz"
    result = convert_layer(str(src), str(dst), ConvertOptions(workers=1))
    verify_blob(BytesSource(dst.read_bytes()), result.toc_digest)


def test_a_refused_layer_is_refused_by_image_convert_before_the_layout_changes(tmp_path):
    layer = gzip_bytes(field("uid", base256(-5, 8)))
    src = tmp_path / "src"
    layout(src, layer)
    dst = tmp_path / "dst"
    r = invoke("convert", f"oci:{src}:latest", f"oci:{dst}:latest")
    assert_refused(r, "invalid tar header at offset 0 ('f'): uid -5 is outside")
    assert not dst.exists()


def gzip_bytes(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)



def _put(root: Path, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (root / "blobs" / "sha256" / digest).write_bytes(data)
    return "sha256:" + digest


def layout(root: Path, layer: bytes) -> None:
    """An OCI layout with one image (tag ``latest``) of the one gzip ``layer``."""
    diff_id = "sha256:" + hashlib.sha256(gzip.decompress(layer)).hexdigest()
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": _put(root, config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": _put(root, layer), "size": len(layer)}]}).encode()
    index = {"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": _put(root, manifest), "size": len(manifest),
        "annotations": {"org.opencontainers.image.ref.name": "latest"}}]}
    (root / "index.json").write_text(json.dumps(index))
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')


@pytest.mark.parametrize("case", ["uid-negative-text", "size=abc", "mtime=nan", "pax-path"])
def test_optimize_extraction_refuses_the_same_headers(tmp_path, case):
    tar = dict((c[0], c[1]) for c in CASES)[case]
    src = write(tmp_path / "in.tar", one_file_tar("first")[:2 * BLOCK] + tar)
    dest = tmp_path / "lower"
    with pytest.raises(InvalidInput, match=f"invalid tar header at offset {2 * BLOCK}"):
        extract_layer(str(src), str(dest))
    assert not dest.exists()
