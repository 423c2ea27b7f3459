"""Plain gzip/tar consumers still read our output and get the input tree back.

``gzip -dc OUT | tar -x`` (GNU tar) and Python's tarfile must reproduce the
input exactly: names, types, modes, owners, link targets, contents, xattrs
and mtimes. Only the landmark and the TOC are extra.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from conftest import CHUNK, Spec, build_tar, every_kind_specs, member_data, run_cli, write

EXTRA = {".no.prefetch.landmark", ".prefetch.landmark", "stargz.index.json"}


def tree(root: Path) -> dict[str, tuple]:
    """Everything GNU tar restored under ``root``, as comparable tuples."""
    out = {}
    inodes: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath, name)
            rel = str(p.relative_to(root))
            if rel in EXTRA:
                continue
            st = p.lstat()
            kind = stat.S_IFMT(st.st_mode)
            xattrs = {}
            if not stat.S_ISLNK(st.st_mode):
                xattrs = {k: os.getxattr(p, k, follow_symlinks=False)
                          for k in os.listxattr(p, follow_symlinks=False)}
            rec = [kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, xattrs]
            if stat.S_ISREG(st.st_mode):
                rec.append(hashlib.sha256(p.read_bytes()).hexdigest())
                if st.st_nlink > 1:  # hardlinked files share one inode
                    rec.append(inodes.setdefault(st.st_ino, rel))
            elif stat.S_ISLNK(st.st_mode):
                rec.append(os.readlink(p))
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                rec.append((os.major(st.st_rdev), os.minor(st.st_rdev)))
            if not stat.S_ISDIR(st.st_mode) and not stat.S_ISLNK(st.st_mode):
                rec.append(int(st.st_mtime))
            out[rel] = tuple(rec)
    return out


def gnu_extract(cmd: str, dest: Path) -> None:
    dest.mkdir()
    subprocess.run(["sh", "-c", f"{cmd} | tar --xattrs --xattrs-include='*' "
                                f"--same-owner --numeric-owner -xpf - -C {dest}"], check=True)


def plain_specs() -> list[Spec]:
    # GNU tar restores only the user.* and security.* xattrs it can set here.
    specs = [s for s in every_kind_specs() if s.name != "etc/xattr"]
    specs.append(Spec("etc/xattr", data=b"x", pax={"SCHILY.xattr.user.comment": "hi"}))
    specs.append(Spec("etc/setgid-dir/", tarfile.DIRTYPE, mode=0o2775, uid=5, gid=6))
    return specs


@pytest.mark.skipif(os.geteuid() != 0, reason="restoring owners and devices needs root")
def test_gnu_tar_extracts_the_input_tree(tmp_path):
    src = write(tmp_path / "in.tar", build_tar(plain_specs()))
    out = tmp_path / "out.esgz"
    run_cli("layer", "convert", src, out, "--chunk-size", str(CHUNK), check=True)
    gnu_extract(f"cat {src}", tmp_path / "a")
    gnu_extract(f"gzip -dc {out}", tmp_path / "b")
    want, got = tree(tmp_path / "a"), tree(tmp_path / "b")
    assert {s.name.rstrip("/") for s in plain_specs()} - {"."} <= set(want)
    assert got == want
    assert (tmp_path / "b" / "stargz.index.json").exists()


def members(path: Path) -> dict[str, tuple]:
    out = {}
    with tarfile.open(path) as tf:
        for m in tf:
            if m.name in EXTRA:
                continue
            data = member_data(tf, m) if m.isreg() else b""
            out[m.name.rstrip("/") or "."] = (
                m.type if not m.isreg() else tarfile.REGTYPE, m.mode & 0o7777, m.uid, m.gid,
                m.uname, m.gname, m.mtime, m.linkname, m.devmajor if m.isdev() else 0,
                m.devminor if m.isdev() else 0,
                {k: v for k, v in m.pax_headers.items() if k.startswith("SCHILY.xattr.")},
                hashlib.sha256(data).hexdigest())
    return out


def test_python_tarfile_reads_the_input_entries(tmp_path):
    src = write(tmp_path / "in.tar", build_tar(every_kind_specs()))
    out = tmp_path / "out.esgz"
    run_cli("layer", "convert", src, out, "--chunk-size", str(CHUNK), check=True)
    want, got = members(src), members(out)
    assert len(want) == len(every_kind_specs())
    assert got == want


def test_plain_consumers_read_the_debian_layer(tmp_path, debian_layer):
    out = tmp_path / "out.esgz"
    run_cli("layer", "convert", debian_layer, out, "--compression-level", "1", check=True)
    assert members(out) == members(debian_layer)
