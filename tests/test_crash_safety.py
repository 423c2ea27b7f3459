"""Crash safety of outputs (issue 11, point 4, the destination part): after
SIGKILL at any moment, an OCI layout, an oci-archive or the work directory
is untouched or complete and valid, and the next run to the same
destination succeeds, produces the digest an uninterrupted run produces,
and leaves no temporary behind (its own, or the killed run's).

A real ``estargz convert`` of busybox is killed when something appears that
marks a phase (the work directory, the layout being assembled, a layer being
written or staged, the lock taken, the archive being written) and at fixed
delays. A trigger that comes too late for a fast run just lets it finish,
which the checks accept too (complete and valid); enough of them must land.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from estargz import OwnedTempDir, stale_tempdirs
from estargz._fsutil import reclaim_tempdirs
from estargz.transports.oci import LOCK_FILE
from layoutcheck import (
    REPO_ROOT,
    check_layout,
    estargz_cmd,
    index_tags,
    leftovers,
    unpack_archive,
)

HEX = re.compile(r"[0-9a-f]{64}")


def any_match(pattern: str, *where: Path) -> Callable[[], bool]:
    return lambda: any(any(w.glob(pattern)) for w in where)


def staged_blob(parent: Path, pattern: str) -> Callable[[], bool]:
    """A finished blob (named by its digest) in a staging directory."""
    return lambda: any(HEX.fullmatch(p.name) for p in parent.glob(pattern))


def kill_when(cmd: list[str], env: dict[str, str], ready: Callable[[], bool]) -> bool:
    """Run ``cmd``; SIGKILL it as soon as ``ready()``; whether it was killed
    (False: it finished first)."""
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                         cwd=REPO_ROOT)
    try:
        deadline = time.monotonic() + 60
        while p.poll() is None and not ready() and time.monotonic() < deadline:
            time.sleep(0.002)
        killed = p.poll() is None
        if killed:
            p.send_signal(signal.SIGKILL)
        _, err = p.communicate(timeout=60)
        assert killed or p.returncode == 0, err.decode()
        return killed
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def convert_json(env: dict[str, str], *args: str) -> dict:
    p = subprocess.run(estargz_cmd("convert", "--json", *args), capture_output=True, env=env,
                       cwd=REPO_ROOT, timeout=120)
    assert p.returncode == 0, p.stderr.decode()
    return json.loads(p.stdout)


@pytest.fixture
def tmpdir_env(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    return tmp, {**os.environ, "TMPDIR": str(tmp)}


@pytest.fixture(scope="module")
def busybox_digest(test_images, tmp_path_factory) -> str:
    """The image digest an uninterrupted conversion of busybox produces."""
    out = tmp_path_factory.mktemp("reference") / "layout"
    return convert_json(dict(os.environ), f"oci:{test_images.busybox}:latest",
                        f"oci:{out}:x")["digest"]


def test_sigkill_into_a_new_layout(tmp_path, test_images, tmpdir_env, busybox_digest):
    tmp, env = tmpdir_env
    src = f"oci:{test_images.busybox}:latest"
    killed = 0
    triggers: dict[str, Callable[[], bool]] = {
        "layout being assembled": lambda: any(tmp_path.glob("t*/.estargz-*.tmp")),
        "layer being written": any_match("t*/.estargz-*.tmp/blobs/sha256/.estargz-*.esgz.tmp",
                                         tmp_path),
        "layer staged": staged_blob(tmp_path, "t*/.estargz-*.tmp/blobs/sha256/*"),
        # Not "index.json written": it is written unnamed (O_TMPFILE) and the
        # layout is renamed an instant after it gets its name.
        "work directory made": any_match("estargz-convert-*", tmp),
    }
    for i, (name, trigger) in enumerate(triggers.items()):
        parent = tmp_path / f"t{i}"
        parent.mkdir()
        out = parent / "layout"
        killed += kill_when(estargz_cmd("convert", "-q", src, f"oci:{out}:x"), env, trigger)
        # Untouched (no layout at all) or complete.
        if out.exists():
            check_layout(out, {"x"}, skopeo=False)
        assert convert_json(env, src, f"oci:{out}:x")["digest"] == busybox_digest, name
        check_layout(out, {"x"}, skopeo=False)
        assert sorted(os.listdir(parent)) == ["layout"], name
        assert leftovers(parent, tmp) == [], name
    assert killed >= len(triggers) - 1, f"only {killed} kills landed mid-run"
    print(f"{killed} of {len(triggers)} runs killed mid-run")


def test_sigkill_into_an_existing_layout(tmp_path, test_images, tmpdir_env, busybox_digest):
    tmp, env = tmpdir_env
    src = f"oci:{test_images.busybox}:latest"
    layout = tmp_path / "layout"
    convert_json(env, src, f"oci:{layout}:seed", "--compression-level", "1")
    tags = {"seed"}
    killed = 0
    triggers = {
        "layer staged": staged_blob(layout, ".estargz-*.tmp/blobs/*"),
        "lock taken": any_match(LOCK_FILE, layout),
        # An event, not a delay: a small image converts in well under a
        # second on a quiet machine.
        "work directory made": any_match("estargz-convert-*", tmp),
    }
    for i, (name, trigger) in enumerate(triggers.items()):
        before = (layout / "index.json").read_bytes()
        ready = trigger
        killed += kill_when(estargz_cmd("convert", "-q", src, f"oci:{layout}:n{i}"), env, ready)
        # Untouched, or complete with the new tag: never a lost one.
        index = json.loads((layout / "index.json").read_bytes())
        if index_tags(index) == sorted(tags):
            assert (layout / "index.json").read_bytes() == before, name
        else:
            check_layout(layout, tags | {f"n{i}"}, skopeo=False)
        assert convert_json(env, src, f"oci:{layout}:n{i}")["digest"] == busybox_digest, name
        tags.add(f"n{i}")
        check_layout(layout, tags, skopeo=False)
        assert leftovers(tmp_path) == [], name
    assert killed >= len(triggers) - 1, f"only {killed} kills landed mid-run"
    print(f"{killed} of {len(triggers)} runs killed mid-run")


def test_sigkill_into_an_oci_archive(tmp_path, test_images, tmpdir_env, busybox_digest):
    tmp, env = tmpdir_env
    src = f"oci:{test_images.busybox}:latest"
    archive = tmp_path / "out" / "image.tar"
    archive.parent.mkdir()
    convert_json(env, src, f"oci-archive:{archive}:seed", "--compression-level", "1")
    tags = {"seed"}
    killed = 0
    triggers = {
        "layer staged": staged_blob(archive.parent, ".estargz-*.tmp/.estargz-*.tmp/blobs/sha256/*"),
        # The archive itself is written as an unnamed file (O_TMPFILE) and
        # named only when complete, so there is nothing to see there.
        "staging directory made": any_match(".estargz-*.tmp", archive.parent),
        "work directory made": any_match("estargz-convert-*", tmp),
    }
    for i, (name, trigger) in enumerate(triggers.items()):
        before = archive.read_bytes()
        ready = trigger
        killed += kill_when(estargz_cmd("convert", "-q", src, f"oci-archive:{archive}:n{i}"),
                            env, ready)
        if archive.read_bytes() != before:  # else untouched
            check_layout(unpack_archive(archive, tmp_path / f"killed{i}"), tags | {f"n{i}"},
                         skopeo=False)
        assert convert_json(env, src, f"oci-archive:{archive}:n{i}")["digest"] == busybox_digest
        tags.add(f"n{i}")
        check_layout(unpack_archive(archive, tmp_path / f"after{i}"), tags, skopeo=False)
        assert sorted(os.listdir(archive.parent)) == ["image.tar", "image.tar.lock"], name
        assert leftovers(archive.parent, tmp) == [], name
    assert killed >= len(triggers) - 1, f"only {killed} kills landed mid-run"
    print(f"{killed} of {len(triggers)} runs killed mid-run")


@pytest.mark.parametrize("left", [["blobs"], ["blobs", "oci-layout"], []])
def test_what_an_older_killed_run_left_is_completed(tmp_path, test_images, tmpdir_env,
                                                    busybox_digest, left):
    """Before this fix a killed convert left blobs/ (and perhaps oci-layout)
    without index.json, and every later convert there failed."""
    _, env = tmpdir_env
    out = tmp_path / "layout"
    (out / "blobs" / "sha256").mkdir(parents=True)
    stray = out / "blobs" / "sha256" / ("0" * 64)  # a blob nothing references
    stray.write_bytes(b"x")
    if "oci-layout" in left:
        (out / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    # Their temporaries among the blobs: an hour old is dead, a fresh one
    # may be a live old writer's.
    dead = [out / "blobs" / "sha256" / n for n in (".estargz-k1llEd.esgz.tmp",
                                                   f".{'1' * 64}.k1llEd.tmp")]
    fresh = out / "blobs" / "sha256" / ".estargz-l1ve.esgz.tmp"
    for path in [*dead, fresh]:
        path.write_bytes(b"partial")
    for path in dead:
        os.utime(path, (time.time() - 7200, time.time() - 7200))
    if not left:
        shutil.rmtree(out / "blobs")  # an empty directory
    src = f"oci:{test_images.busybox}:latest"
    assert convert_json(env, src, f"oci:{out}:x")["digest"] == busybox_digest
    check_layout(out, {"x"})
    if left:
        assert not any(p.exists() for p in dead) and fresh.exists()


def test_a_directory_that_is_not_a_layout_is_refused(tmp_path, test_images, tmpdir_env):
    _, env = tmpdir_env
    out = tmp_path / "notes"
    out.mkdir()
    (out / "todo.txt").write_text("mine")
    p = subprocess.run(estargz_cmd("convert", f"oci:{test_images.busybox}:latest",
                                   f"oci:{out}:x"), capture_output=True, text=True, env=env,
                       cwd=REPO_ROOT)
    assert p.returncode != 0
    assert p.stderr.count("\n") == 1 and "not an OCI image layout" in p.stderr
    assert os.listdir(out) == ["todo.txt"]


def test_reclaim_spares_a_live_owner_and_takes_a_dead_ones(tmp_path):
    held = OwnedTempDir(str(tmp_path), "estargz-")
    (Path(held.path) / "data").write_bytes(b"x")
    # A child holds one through fork, as a killed run's would until it dies.
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]);"
         "from estargz._fsutil import OwnedTempDir;"
         "d = OwnedTempDir(sys.argv[2], 'estargz-'); print(d.path, flush=True); time.sleep(60)",
         str(REPO_ROOT), str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        theirs = child.stdout.readline().strip()
        assert reclaim_tempdirs(str(tmp_path), "estargz-") == []
        assert os.path.isdir(held.path) and os.path.isdir(theirs)
        child.kill()
        child.wait()
        assert reclaim_tempdirs(str(tmp_path), "estargz-") == [theirs]
        assert not os.path.exists(theirs) and os.path.isdir(held.path)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    held.cleanup()
    assert os.listdir(tmp_path) == []


def test_reclaim_never_reaches_through_a_mount(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    owned = OwnedTempDir(str(tmp_path), "estargz-")
    owned.release()  # what a killed owner leaves: the directory, unlocked
    mnt = Path(owned.path) / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", mnt], check=True)
    try:
        (mnt / "precious").write_bytes(b"x")
        assert reclaim_tempdirs(str(tmp_path), "estargz-") == []
        assert (mnt / "precious").read_bytes() == b"x"
    finally:
        subprocess.run(["umount", mnt], check=True)
    assert reclaim_tempdirs(str(tmp_path), "estargz-") == [owned.path]
    assert os.listdir(tmp_path) == []


def test_another_users_dead_directory_is_left_alone(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("making another user's directory needs root")
    mine, theirs = (OwnedTempDir(str(tmp_path), "estargz-") for _ in range(2))
    for d in (mine, theirs):
        d.release()  # both owners dead
    os.chown(theirs.path, 65534, 65534)
    assert list(stale_tempdirs(str(tmp_path), "estargz-")) == [mine.path]
    assert reclaim_tempdirs(str(tmp_path), "estargz-") == [mine.path]
    assert os.listdir(tmp_path) == [os.path.basename(theirs.path)]


def open_files(pid: int) -> list[str]:
    """What process ``pid``'s descriptors point at (racing its opens and closes)."""
    targets = []
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return []
    for f in fds:
        try:
            targets.append(os.readlink(f))
        except OSError:
            continue
    return targets


def test_sigkill_of_layer_convert_leaves_no_temporary_file(tmp_path, test_images, tmpdir_env):
    """`layer convert` writes its output unnamed (O_TMPFILE) until it is
    complete: killed mid-write, it leaves nothing beside OUT."""
    tmp, env = tmpdir_env
    blob = max((test_images.debian_python3 / "blobs" / "sha256").iterdir(),
               key=lambda f: f.stat().st_size)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    p = subprocess.Popen(estargz_cmd("layer", "convert", str(blob), str(out_dir / "l.esgz")),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                         cwd=REPO_ROOT)
    try:
        # Mid-write: the process has its output open (an unnamed file in
        # out_dir shows as "/…/out/#NNN (deleted)" among its descriptors).
        deadline = time.monotonic() + 60
        while p.poll() is None and time.monotonic() < deadline:
            if any(str(out_dir) in target for target in open_files(p.pid)):
                break
            time.sleep(0.01)
        assert p.poll() is None, "finished before it was seen writing"
        p.send_signal(signal.SIGKILL)
        p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert list(out_dir.iterdir()) == []


# --- durability: what a power cut may leave ------------------------------------------

_SYSCALL = re.compile(r"^(\d+)\s+(\w+)\((.*)\)\s+= (-?\d+)")
_FD_PATH = re.compile(r"^\d+<(.*?)>")
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')


def _synced_names(trace: str) -> tuple[dict[str, bool], list[tuple[str, str]]]:
    """From ``strace -f -y`` of fsync, linkat and rename: which names were
    given to file contents already fsynced, and the calls in order as
    (call, path) (the renamed-to path, or the fsynced one)."""
    synced: dict[str, bool] = {}
    pending: dict[str, bool] = {}  # thread -> an unnamed file was just fsynced
    calls: list[tuple[str, str]] = []
    for line in trace.splitlines():
        m = _SYSCALL.match(line)
        if not m or m.group(4) != "0":
            continue
        tid, call, args = m.group(1), m.group(2), m.group(3)
        if call == "fsync":
            path = _FD_PATH.match(args).group(1)  # type: ignore[union-attr]
            if path.endswith("(deleted)") or "/#" in path:
                pending[tid] = True  # O_TMPFILE: the linkat after it names it
            else:
                synced[path] = True
            calls.append(("fsync", path))
        elif call == "linkat":
            synced[_QUOTED.findall(args)[-1]] = pending.pop(tid, False)
        elif call in ("rename", "renameat", "renameat2"):
            src, dst = _QUOTED.findall(args)[:2]
            synced[dst] = synced.get(src, False)
            calls.append(("rename", dst))
    return synced, calls


@pytest.mark.parametrize("existing", [False, True], ids=["new layout", "existing layout"])
def test_every_blob_is_synced_before_index_json_names_it(tmp_path, test_images, existing):
    out = tmp_path / "layout"
    src = f"oci:{test_images.busybox}:latest"
    if existing:
        subprocess.run(estargz_cmd("convert", "-q", src, f"oci:{out}:first"), check=True,
                       cwd=REPO_ROOT, timeout=120)
        shutil.rmtree(out / "blobs")  # every blob must be written again
        (out / "blobs" / "sha256").mkdir(parents=True)
    trace = tmp_path / "trace"
    subprocess.run(["strace", "-f", "-qq", "-y", "-o", str(trace),
                    "-e", "trace=fsync,linkat,rename,renameat,renameat2",
                    *estargz_cmd("convert", "-q", src, f"oci:{out}:x")],
                   check=True, cwd=REPO_ROOT, timeout=300)
    synced, calls = _synced_names(trace.read_text())
    blobs = sorted(p.name for p in (out / "blobs" / "sha256").iterdir())
    assert blobs and all(HEX.fullmatch(b) for b in blobs)
    for blob in blobs:
        named = [p for p, ok in synced.items() if p.endswith(f"/blobs/sha256/{blob}")]
        assert named and all(synced[p] for p in named), (blob, named)
    # index.json is renamed into place (in the layout, or in the new layout
    # before it is renamed whole) only after the blobs' directory is synced,
    # and the last rename of all is followed by a sync of its directory.
    index_at = max(i for i, (c, p) in enumerate(calls)
                   if c == "rename" and p.endswith("/index.json"))
    assert any(c == "fsync" and p.endswith("/blobs/sha256") for c, p in calls[:index_at])
    last = max(i for i, (c, _) in enumerate(calls) if c == "rename")
    assert calls[last + 1] == ("fsync", os.path.dirname(calls[last][1])), calls[last:]
