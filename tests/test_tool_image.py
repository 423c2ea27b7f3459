"""The tool as a container image (Dockerfile, scripts/build-tool-image.py),
run by Debian's Docker engine on a private socket, and the pipeline recipes
of docs/recipes/ run as far as this machine allows.

Each privilege the container needs is shown needed: the run without it fails
with the line the docs quote.  Records made in a container equal the host's,
byte for byte; conversions give the host's digests.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import yaml

from conftest import REPO, run_cli
from daemons import Dockerd
from estargz._version import __version__
from services import RegistryDaemon

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="dockerd needs root")

BUILD = REPO / "scripts" / "build-tool-image.py"
SECCOMP = REPO / "container" / "seccomp.json"
RECIPES = REPO / "docs" / "recipes"
DOCKER_DEFAULT_SECCOMP = Path("/usr/share/gocode/src/github.com/docker/docker/profiles/"
                             "seccomp/default.json")
#: What container/seccomp.json allows beyond Docker's default profile.
ROOTLESS_SYSCALLS = ["fanotify_init", "keyctl", "mount", "name_to_handle_at", "pivot_root",
                     "sethostname", "umount2", "unshare"]
PLAIN_HTTP = "--src-tls-verify=false --dest-tls-verify=false"
#: `estargz optimize` as root in a container: the fewest privileges that work.
ROOT_OPTS = ("--cap-add", "SYS_ADMIN", "--cap-add", "NET_ADMIN",
             "--security-opt", f"seccomp={SECCOMP}", "--mount", "type=volume,dst=/tmp")
#: Rootless `estargz optimize` in a container: no capability at all, and
#: Docker's masked /proc (no systempaths=unconfined, which GitLab's Docker
#: executor cannot give).
ROOTLESS_OPTS = ("--user", "1000:1000", "--cap-drop", "ALL",
                 "--security-opt", "no-new-privileges",
                 "--security-opt", f"seccomp={SECCOMP}")


# --- fixtures and helpers --------------------------------------------------------------

@pytest.fixture(scope="module")
def tool_image(dockerd: Dockerd) -> str:
    """The tool image in the test daemon: built once, then loaded from the cache."""
    p = subprocess.run([sys.executable, str(BUILD)], capture_output=True, text=True,
                       env=dockerd.env, timeout=1800)
    if p.returncode != 0:
        pytest.fail(f"{BUILD.name} exited {p.returncode}:\n{p.stderr[-4000:]}")
    return p.stdout.strip().splitlines()[-1]


def docker_run(dockerd: Dockerd, image: str, *args: str, opts: Sequence[str] = (),
               timeout: float = 600) -> subprocess.CompletedProcess:
    return dockerd.docker("run", "--rm", *opts, image, *args, check=False, timeout=timeout)


def push(registry: RegistryDaemon, layout: Path, name: str) -> str:
    """Copy an OCI layout's "latest" (every platform) into the registry, as a
    build would push it."""
    ref = f"{registry.host}/{name}"
    subprocess.run(["skopeo", "copy", "--quiet", "--all", "--dest-tls-verify=false",
                    f"oci:{layout}:latest", f"docker://{ref}"], check=True, timeout=300)
    return ref


def manifest(ref: str) -> dict:
    out = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    return json.loads(out)


def is_estargz(ref: str) -> bool:
    """Every layer of ``ref`` (of its first manifest, for an index) has a TOC digest."""
    m = manifest(ref)
    if "manifests" in m:
        m = manifest(ref.rsplit(":", 1)[0] + "@" + m["manifests"][0]["digest"])
    layers = m["layers"]
    return bool(layers) and all("containerd.io/snapshot/stargz/toc.digest"
                                in ln.get("annotations", {}) for ln in layers)


@pytest.fixture(scope="module")
def host_record(test_images, tmp_path_factory) -> bytes:
    """debian-python3's own workload profiled on the host, as root."""
    record = tmp_path_factory.mktemp("host") / "record.jsonl"
    r = run_cli("optimize", f"oci:{test_images.debian_python3}:latest", "--no-optimize",
                "--record-out", record)
    assert r.code == 0, r.err
    return record.read_bytes()


@pytest.fixture
def out(tmp_path: Path) -> Path:
    """A directory the container's nobody can write."""
    d = tmp_path / "out"
    d.mkdir()
    d.chmod(0o777)
    return d


def mounts(test_images, out: Path) -> tuple[str, ...]:
    return ("-v", f"{test_images.debian_python3}:/image:ro",
            "-v", f"{test_images.busybox}:/busybox:ro", "-v", f"{out}:/out")


def without(opts: Sequence[str], *drop: str) -> tuple[str, ...]:
    """``opts`` without the option pairs whose value starts with one of ``drop``."""
    pairs = list(zip(opts[::2], opts[1::2], strict=True))
    return tuple(x for flag, value in pairs if not value.startswith(drop) for x in (flag, value))


# --- the image ------------------------------------------------------------------------

def test_image_is_versioned_small_and_has_what_optimize_needs(dockerd, tool_image):
    assert tool_image == f"estargz:{__version__}"
    info = json.loads(dockerd.docker("image", "inspect", tool_image).stdout)[0]
    assert info["Config"]["Labels"]["org.opencontainers.image.version"] == __version__
    # 160 MB when measured (2026-11-30): Debian's -slim base 74 MB, python3 and runc
    # 53 MB (12 MB more than in the first measurement: Debian's updated packages), the
    # venv 33.5 MB. 170 MB leaves room for Debian's updates, not for a venv twice the size.
    assert info["Size"] < 170e6, info["Size"]
    r = docker_run(dockerd, tool_image, "--version")
    assert r.returncode == 0 and r.stdout.strip() == f"estargz, version {__version__}"
    r = docker_run(dockerd, tool_image, "-c",
                   "runc --version | head -1; ls /opt/estargz/bin; ls /var/lib/apt/lists | wc -l",
                   opts=("--entrypoint", "sh"))
    lines = r.stdout.splitlines()
    assert lines[0].startswith("runc version"), r.stdout + r.stderr
    assert "estargz" in lines and not {"pip", "pip3"} & set(lines), lines
    assert lines[-1] == "0", "apt lists left in the image"
    # The seccomp profile the docs tell the host to take from the image.
    r = docker_run(dockerd, tool_image, "/usr/share/estargz/seccomp.json",
                   opts=("--entrypoint", "cat"))
    assert r.stdout == SECCOMP.read_text()


def test_seccomp_profile_is_dockers_default_plus_what_rootless_profiling_needs():
    ours = json.loads(SECCOMP.read_text())
    added = ours["syscalls"][-1]
    assert sorted(added["names"]) == ROOTLESS_SYSCALLS
    assert added["action"] == "SCMP_ACT_ALLOW" and not added["includes"] and not added["args"]
    if not DOCKER_DEFAULT_SECCOMP.exists():
        pytest.skip(f"{DOCKER_DEFAULT_SECCOMP} (golang-github-docker-docker-dev) not installed")
    default = json.loads(DOCKER_DEFAULT_SECCOMP.read_text())
    assert ours["syscalls"][:-1] == default["syscalls"]
    assert {k: v for k, v in ours.items() if k != "syscalls"} == \
        {k: v for k, v in default.items() if k != "syscalls"}


def test_convert_registry_to_registry_gives_the_hosts_digest(dockerd, tool_image, registry,
                                                               test_images, tmp_path):
    src = push(registry, test_images.busybox, "tool/busybox:1")
    r = docker_run(dockerd, tool_image, "convert", *PLAIN_HTTP.split(), f"docker://{src}",
                   f"docker://{src}-esgz", "--json", opts=("--network", "host"))
    assert r.returncode == 0, r.stderr
    in_container = json.loads(r.stdout)["digest"]
    host = run_cli("convert", f"oci:{test_images.busybox}:latest", f"oci:{tmp_path / 'o'}",
                   "--json")
    assert host.code == 0, host.err
    assert in_container == host.json()["digest"]
    assert is_estargz(f"{src}-esgz")


# --- optimize: as root, the fewest privileges -----------------------------------------

def test_optimize_as_root_in_a_container(dockerd, tool_image, test_images, out, host_record,
                                        tmp_path):
    """The whole command: the record is the host's, and the host converting
    with that record makes the same image."""
    r = docker_run(dockerd, tool_image, "optimize", "oci:/image:latest", "oci:/out/opt:opt",
                   "--record-out", "/out/record.jsonl", "--json",
                   opts=(*ROOT_OPTS, *mounts(test_images, out)))
    assert r.returncode == 0, r.stderr
    assert (out / "record.jsonl").read_bytes() == host_record
    again = run_cli("convert", f"oci:{test_images.debian_python3}:latest",
                    f"oci:{tmp_path / 'again'}", "--record-in", out / "record.jsonl", "--json")
    assert again.code == 0, again.err
    assert again.json()["digest"] == json.loads(r.stdout)["image"]["digest"]


@pytest.mark.parametrize("drop, entrypoint, error", [
    # the profiling helper's own mount and PID namespaces come first
    pytest.param("SYS_ADMIN", None, "cannot create a mount and PID namespace: "
                 "Operation not permitted", id="SYS_ADMIN"),
    # runc brings up the loopback of the workload's network namespace
    pytest.param("NET_ADMIN", None, "runc create failed: unable to start container process: "
                 "error during container init: operation not permitted", id="NET_ADMIN"),
    # keyctl, refused by Docker's default profile even with CAP_SYS_ADMIN
    pytest.param("seccomp=", None, "unable to join session keyring", id="seccomp"),
    # without the entrypoint's remount, the container's cgroups stay read-only
    pytest.param("", "estargz", "read-only file system", id="cgroup-remount"),
])
def test_each_root_privilege_is_needed(dockerd, tool_image, test_images, out, drop, entrypoint,
                                       error):
    opts = without(ROOT_OPTS, drop) if drop else ROOT_OPTS
    if entrypoint:
        opts = (*opts, "--entrypoint", entrypoint)
    r = docker_run(dockerd, tool_image, "optimize", "oci:/busybox:latest", "--no-optimize",
                   "--args", '["true"]', opts=(*opts, *mounts(test_images, out)))
    assert r.returncode != 0
    assert error in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


# --- optimize: rootless, no capability -----------------------------------------------------

def test_rootless_optimize_in_a_container_without_capabilities(dockerd, tool_image,
                                                               test_images, out, host_record):
    """Under Docker's masked /proc the kernel refuses the profiler a new
    procfs: it profiles in the container's PID namespace, with its /proc
    bound into the sandbox, and the record is still the host's."""
    # busybox ls stats each entry: a process that exits meanwhile is an
    # error line on stderr, which the workload's output would include.
    script = "ls /proc 2>/dev/null | grep -cE '^[0-9]+$'; wc -c < /proc/keys"
    r = docker_run(dockerd, tool_image, "optimize", "oci:/image:latest", "--no-optimize",
                   "--record-out", "/out/record.jsonl",
                   opts=(*ROOTLESS_OPTS, *mounts(test_images, out)))
    assert r.returncode == 0, r.stderr
    assert (out / "record.jsonl").read_bytes() == host_record
    # The sandbox's /proc is the container's: its processes are listed, the
    # masks are Docker's.
    r = docker_run(dockerd, tool_image, "optimize", "oci:/busybox:latest", "--no-optimize",
                   "--entrypoint", '["/bin/sh", "-c"]', "--args", json.dumps([script]),
                   opts=(*ROOTLESS_OPTS, *mounts(test_images, out)))
    assert r.returncode == 0, r.stderr
    seen = [ln.removeprefix("workload: ") for ln in r.stderr.splitlines()
            if ln.startswith("workload: ")]
    assert int(seen[0]) > 3 and seen[1:] == ["0"], r.stderr
    # doctor says so before anyone profiles.
    r = docker_run(dockerd, tool_image, "doctor", "--json", opts=ROOTLESS_OPTS)
    assert r.returncode == 0, r.stderr
    rootless = json.loads(r.stdout)["modes"][1]
    proc = [c for c in rootless["checks"] if c["name"] == "/proc"]
    assert rootless["supported"] and proc and proc[0]["ok"], r.stdout
    assert proc[0]["detail"].startswith("a new procfs is refused (masked /proc)"), r.stdout


def test_what_dockers_default_seccomp_profile_blocks_for_rootless(dockerd, tool_image,
                                                                  test_images, out):
    r = docker_run(dockerd, tool_image, "optimize", "oci:/busybox:latest", "--no-optimize",
                   "--args", '["true"]',
                   opts=(*without(ROOTLESS_OPTS, "seccomp="), *mounts(test_images, out)))
    assert r.returncode != 0
    assert ("cannot create a user and mount namespace "
            "(unshare(CLONE_NEWUSER|CLONE_NEWNS): EPERM") in r.stderr, r.stderr


# --- the recipes -------------------------------------------------------------------------------

def test_makefile_recipe_converts_through_the_registry(registry, test_images, tmp_path):
    src = push(registry, test_images.busybox, "make/app:1")
    p = subprocess.run(["make", "-f", str(RECIPES / "Makefile"), "esgz", f"IMAGE={src}",
                        f"ESTARGZ={shlex.quote(sys.executable)} -m estargz",
                        f"ESTARGZ_OPTS={PLAIN_HTTP}"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    summary = json.loads((tmp_path / "esgz-summary.json").read_text())
    assert manifest(f"{src}-esgz") == manifest(f"{registry.host}/make/app@{summary['digest']}")
    assert is_estargz(f"{src}-esgz")


def test_github_actions_recipe(dockerd, tool_image, registry, test_images, tmp_path,
                               host_record):
    """The job's `run:` steps, run by bash against the test daemon, as the
    runner would; only the registry log-in (GitHub's token) is left out."""
    doc = yaml.safe_load((RECIPES / "github-actions.yml").read_text())
    (job,) = doc["jobs"].values()
    steps = [s for s in job["steps"] if "run" in s]
    assert [s["name"] for s in steps] == ["log in to the registry", "optimize"]
    assert "${{" not in steps[1]["run"]
    src = push(registry, test_images.debian_python3, "gh/app:1")
    home = tmp_path / "home"
    (home / ".docker").mkdir(parents=True)
    (home / ".docker" / "config.json").write_text('{"auths": {}}')
    env = {**dockerd.env, **{k: v for k, v in job["env"].items() if "${{" not in v},
           "HOME": str(home), "IMAGE": src, "ESTARGZ_IMAGE": tool_image,
           # Record only: test_optimize_as_root_in_a_container converts, with
           # the same privileges, and the image's digest is checked there.
           "ESTARGZ_OPTS": f"{PLAIN_HTTP} --no-optimize"}
    p = subprocess.run(["bash", "-eo", "pipefail", "-c", steps[1]["run"]], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr
    out = tmp_path / "estargz-out"
    # The same bytes: the pushed manifest is the layout's, and so is its digest.
    assert (out / "record.jsonl").read_bytes() == host_record
    assert "files accessed" in (out / "report.html").read_text()
    assert json.loads((out / "summary.json").read_text())["accessed"]


def test_gitlab_ci_recipe_rootless(dockerd, tool_image, registry, test_images, tmp_path,
                                   host_record):
    """The job's `script:` in the tool image, started as GitLab's Docker
    executor starts it (root, Docker's default capabilities and masked
    /proc) with the runner setting docs/pipelines.md gives, the seccomp
    profile: the profile runs rootless."""
    (job,) = yaml.safe_load((RECIPES / "gitlab-ci.yml").read_text()).values()
    assert job["image"]["entrypoint"] == [""]
    src = push(registry, test_images.debian_python3, "gl/app:1")
    variables = {**job["variables"], "IMAGE": src,
                 # Record only: the GitHub recipe's test pushes the optimized image.
                 "ESTARGZ_OPTS": f"{PLAIN_HTTP} --no-optimize",
                 "CI_REGISTRY": registry.host, "CI_REGISTRY_USER": "ci",
                 "CI_REGISTRY_PASSWORD": "secret"}
    build = tmp_path / "build"
    build.mkdir()
    script = "\n".join(job["script"])
    runner = ("--network", "host", "--entrypoint", "sh", "-v", f"{build}:/builds/project",
              "-w", "/builds/project", "--security-opt", f"seccomp={SECCOMP}",
              *(x for k, v in variables.items() for x in ("-e", f"{k}={v}")))
    r = docker_run(dockerd, tool_image, "-euc", script, opts=runner, timeout=900)
    assert r.returncode == 0, r.stderr
    out = build / "estargz-out"
    # The same bytes: the pushed manifest is the layout's, and so is its digest.
    assert (out / "record.jsonl").read_bytes() == host_record
    assert not (out / "auth.json").exists()


def k8s_docker_opts(pod: dict, container: dict, volumes: dict[str, Path]) -> list[str]:
    """The pod's and container's securityContext, env and volumes as docker
    run options (``volumes``: volume name -> host directory holding its files)."""
    pod_sc, sc = pod.get("securityContext", {}), container.get("securityContext", {})
    opts = ["--user", f"{pod_sc['runAsUser']}:{pod_sc['runAsGroup']}"]
    assert pod_sc["runAsNonRoot"] and pod_sc["runAsUser"] != 0
    assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault"  # Docker's default profile
    assert not sc.get("privileged", False)
    opts += [x for cap in sc["capabilities"].get("drop", []) for x in ("--cap-drop", cap)]
    assert not sc["capabilities"].get("add")
    if sc.get("allowPrivilegeEscalation") is False:
        opts += ["--security-opt", "no-new-privileges"]
    if sc.get("readOnlyRootFilesystem"):
        opts.append("--read-only")
    by_name = {v["name"]: v for v in pod["volumes"]}
    for m in container["volumeMounts"]:
        vol = by_name[m["name"]]
        if "emptyDir" in vol:
            opts += ["--tmpfs", f"{m['mountPath']}:mode=1777"]
        else:
            ro = ":ro" if m.get("readOnly") else ""
            opts += ["-v", f"{volumes[m['name']]}:{m['mountPath']}{ro}"]
    opts += [x for e in container["env"] for x in ("-e", f"{e['name']}={e['value']}")]
    return opts


def test_kubernetes_batch_job(dockerd, tool_image, registry, test_images, tmp_path):
    """The Indexed Job's pods, each run in Docker with its securityContext as
    docker options, convert the ConfigMap's images through the registry."""
    config_map, job = yaml.safe_load_all((RECIPES / "k8s-batch-job.yaml").read_text())
    assert config_map["kind"] == "ConfigMap" and job["kind"] == "Job"
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == len(config_map["data"]["images.txt"].splitlines())
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert {v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v} == \
        {config_map["metadata"]["name"]}
    # Our batch: three images of this registry.
    refs = [push(registry, layout, f"k8s/app{i}:1") for i, layout in
            enumerate((test_images.busybox, test_images.lazy_kinds,
                       test_images.two_platform))]
    files = {"images": tmp_path / "images", "auth": tmp_path / "auth"}
    for d in files.values():
        d.mkdir()
        d.chmod(0o755)
    (files["images"] / "images.txt").write_text(
        "".join(f"docker://{r} docker://{r}-esgz\n" for r in refs))
    (files["auth"] / ".dockerconfigjson").write_text('{"auths": {}}')
    for f in (files["images"] / "images.txt", files["auth"] / ".dockerconfigjson"):
        f.chmod(0o644)
    opts = k8s_docker_opts(pod, container, files)
    opts = [*opts, "-e", f"ESTARGZ_OPTS={PLAIN_HTTP}", "--network", "host",
            "--entrypoint", container["command"][0]]
    for index in range(spec["completions"]):
        r = docker_run(dockerd, tool_image, *container["command"][1:],
                       opts=[*opts, "-e", f"JOB_COMPLETION_INDEX={index}"])
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["digest"] == \
            "sha256:" + manifest_digest(f"{refs[index]}-esgz")
        assert is_estargz(f"{refs[index]}-esgz")
    # An index past the list fails with one line.
    r = docker_run(dockerd, tool_image, *container["command"][1:],
                   opts=[*opts, "-e", "JOB_COMPLETION_INDEX=3"])
    assert r.returncode == 2 and r.stderr.strip() == "no image for index 3"


def manifest_digest(ref: str) -> str:
    out = subprocess.run(["skopeo", "inspect", "--tls-verify=false", "--format", "{{.Digest}}",
                          f"docker://{ref}"], capture_output=True, text=True, check=True,
                         timeout=60).stdout
    return out.strip().removeprefix("sha256:")
