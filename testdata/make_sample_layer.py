#!/usr/bin/env python3
"""Write testdata/sample-layer.tar.gz: the small layer bundled for the demo.

A little of everything a real layer holds (directories, small and chunked
files, symlinks, a hardlink, a device, a whiteout, xattrs), built
deterministically so the committed file can be re-made byte for byte:
``python3 testdata/make_sample_layer.py``.
"""

import gzip
import io
import random
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
MTIME = 1_704_067_200  # 2024-01-01


def text(n: int, seed: int) -> bytes:
    rnd = random.Random(seed)
    words = ["layer", "chunk", "lazy", "pull", "container", "gzip", "prefetch", "snapshot"]
    out = " ".join(rnd.choice(words) for _ in range(n // 5))
    return out.encode()[:n]


def main() -> None:
    entries = [
        ("app/", tarfile.DIRTYPE, b"", {}),
        ("app/bin/", tarfile.DIRTYPE, b"", {}),
        ("app/bin/server", tarfile.REGTYPE, text(300_000, 1), {}),
        ("app/bin/start", tarfile.SYMTYPE, b"server", {}),
        ("app/config.json", tarfile.REGTYPE, b'{"port": 8080}\n', {}),
        ("app/lib/", tarfile.DIRTYPE, b"", {}),
        ("app/lib/libapp.so", tarfile.REGTYPE, random.Random(2).randbytes(90_000), {}),
        ("app/lib/libapp.so.1", tarfile.LNKTYPE, b"app/lib/libapp.so", {}),
        ("app/share/", tarfile.DIRTYPE, b"", {}),
        ("app/share/README", tarfile.REGTYPE, text(5_000, 3),
         {"SCHILY.xattr.user.origin": "sample"}),
        ("app/share/.wh.old-docs", tarfile.REGTYPE, b"", {}),
        ("dev/", tarfile.DIRTYPE, b"", {}),
        ("dev/null", tarfile.CHRTYPE, b"", {}),
    ]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, kind, data, pax in entries:
            ti = tarfile.TarInfo(name)
            ti.type, ti.mtime, ti.uname, ti.gname = kind, MTIME, "root", "root"
            ti.mode = 0o755 if kind == tarfile.DIRTYPE or name.startswith("app/bin") else 0o644
            ti.pax_headers = pax
            if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                ti.linkname = data.decode()
                data = b""
            if kind == tarfile.CHRTYPE:
                ti.devmajor, ti.devminor, ti.mode = 1, 3, 0o666
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data) if data else None)
    out = HERE / "sample-layer.tar.gz"
    with open(out, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0, filename="") as gz:
        gz.write(buf.getvalue())
    print(out)


if __name__ == "__main__":
    main()
