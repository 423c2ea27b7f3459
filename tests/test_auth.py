"""Where registry credentials come from: explicit USER:PASS, auth files,
Docker's config.json, and credential helpers (fake ones, put on PATH)."""

from __future__ import annotations

import base64
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from estargz import AuthenticationError, InvalidInput
from estargz.registry.credentials import (
    DOCKER_HUB_AUTH_KEY,
    find_credentials,
    parse_creds,
    resolve_credentials,
)

HOST = "reg.example:5000"


@dataclass
class Env:
    home: Path
    bin: Path
    tmp: Path

    @property
    def docker_config(self) -> Path:
        return self.home / ".docker" / "config.json"

    @property
    def containers_auth(self) -> Path:
        return self.home / ".config" / "containers" / "auth.json"


@pytest.fixture(autouse=True)
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Env:
    """A home of our own, no auth variables, and a bin/ first on PATH."""
    home = tmp_path / "home"
    home.mkdir()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    for var in ("XDG_RUNTIME_DIR", "XDG_CONFIG_HOME", "DOCKER_CONFIG", "REGISTRY_AUTH_FILE"):
        monkeypatch.delenv(var, raising=False)
    return Env(home, bindir, tmp_path)


def b64(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def write_json(path: Path, doc: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
    return path


def fake_helper(env: Env, name: str, store: dict[str, tuple[str, str]], *,
                script: str = "") -> Path:
    """``docker-credential-NAME`` answering ``get`` from ``store``; it logs
    each call (argv and stdin) to ``<tmp>/NAME.calls``."""
    log = env.tmp / f"{name}.calls"
    body = script or f"""
store = {json.dumps({k: list(v) for k, v in store.items()})}
if server in store:
    user, secret = store[server]
    print(json.dumps({{"ServerURL": server, "Username": user, "Secret": secret}}))
else:
    print("credentials not found in native keychain")
    sys.exit(1)
"""
    exe = env.bin / f"docker-credential-{name}"
    exe.write_text(f"""#!{sys.executable}
import json, sys
server = sys.stdin.read()
with open({str(log)!r}, "a") as f:
    f.write(json.dumps([sys.argv[1:], server]) + "\\n")
{body}""")
    exe.chmod(0o755)
    return log


def calls(log: Path) -> list:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


# --- USER:PASS ---------------------------------------------------------------------

def test_parse_creds() -> None:
    assert parse_creds("alice:pw") == ("alice", "pw")
    assert parse_creds("alice:p:w:") == ("alice", "p:w:")  # the password keeps its colons
    assert parse_creds("alice:") == ("alice", "")


@pytest.mark.parametrize("text", ["alice-and-a-secret", ":secret-pw"])
def test_malformed_creds_are_named_without_echoing_them(text: str) -> None:
    with pytest.raises(InvalidInput) as e:
        parse_creds(text, "--src-creds")
    assert str(e.value).startswith("--src-creds must be USER:PASS")
    assert "secret" not in str(e.value)


# --- precedence ----------------------------------------------------------------------

def test_nothing_configured_is_anonymous() -> None:
    assert resolve_credentials(HOST) is None


def test_explicit_credentials_win(env: Env) -> None:
    write_json(env.docker_config, {"auths": {HOST: {"auth": b64("docker", "pw")}}})
    assert resolve_credentials(HOST, explicit=("me", "mine")) == ("me", "mine")


def test_precedence_of_the_files(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    def entry(user: str) -> dict:
        return {"auths": {HOST: {"auth": b64(user, "pw-" + user)}}}

    write_json(env.docker_config, entry("docker"))
    assert resolve_credentials(HOST) == ("docker", "pw-docker")
    write_json(env.containers_auth, entry("config-home"))
    assert resolve_credentials(HOST) == ("config-home", "pw-config-home")
    runtime = env.tmp / "run"
    write_json(runtime / "containers" / "auth.json", entry("runtime"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    assert resolve_credentials(HOST) == ("runtime", "pw-runtime")
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(write_json(env.tmp / "env.json", entry("env"))))
    assert resolve_credentials(HOST) == ("env", "pw-env")
    arg = write_json(env.tmp / "arg.json", entry("arg"))
    assert resolve_credentials(HOST, auth_file=str(arg)) == ("arg", "pw-arg")
    found = find_credentials(HOST, auth_file=str(arg))
    assert found is not None
    assert found.source == f"from {arg}" and "pw-arg" not in repr(found)


def test_a_file_without_the_host_passes_the_question_on(env: Env,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    write_json(env.docker_config, {"auths": {HOST: {"auth": b64("docker", "pw")}}})
    other = write_json(env.tmp / "other.json", {"auths": {"elsewhere.example": {
        "auth": b64("x", "y")}}})
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(other))
    assert resolve_credentials(HOST) == ("docker", "pw")
    assert resolve_credentials("elsewhere.example") == ("x", "y")


def test_docker_config_env(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    write_json(env.tmp / "dc" / "config.json", {"auths": {HOST: {"auth": b64("dc", "pw")}}})
    monkeypatch.setenv("DOCKER_CONFIG", str(env.tmp / "dc"))
    assert resolve_credentials(HOST) == ("dc", "pw")


def test_xdg_config_home(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    write_json(env.tmp / "cfg" / "containers" / "auth.json",
               {"auths": {HOST: {"auth": b64("xdg", "pw")}}})
    monkeypatch.setenv("XDG_CONFIG_HOME", str(env.tmp / "cfg"))
    assert resolve_credentials(HOST) == ("xdg", "pw")


# --- auths entries -----------------------------------------------------------------------

def test_auths_entry_forms_and_keys(env: Env) -> None:
    write_json(env.docker_config, {"auths": {
        "https://old.example/v1/": {"auth": b64("old", "pw1")},
        "http://plain.example:5000": {"auth": b64("plain", "pw2")},
        "fields.example": {"username": "fields", "password": "pw3"},
        "ns.example/team/app": {"auth": b64("ns", "pw4")},
        "empty.example": {},
    }})
    assert resolve_credentials("old.example") == ("old", "pw1")
    assert resolve_credentials("plain.example:5000") == ("plain", "pw2")
    assert resolve_credentials("fields.example") == ("fields", "pw3")
    # A namespace-scoped key does not stand for the whole host.
    assert resolve_credentials("ns.example") is None
    # An empty entry (docker login with a credsStore) means nothing here.
    assert resolve_credentials("empty.example") is None
    assert resolve_credentials("plain.example") is None  # the port matters


@pytest.mark.parametrize("host", ["docker.io", "registry-1.docker.io", "index.docker.io"])
def test_docker_hub_keys(env: Env, host: str) -> None:
    write_json(env.docker_config, {"auths": {DOCKER_HUB_AUTH_KEY: {"auth": b64("hub", "pw")}}})
    assert resolve_credentials(host) == ("hub", "pw")
    write_json(env.containers_auth, {"auths": {"docker.io": {"auth": b64("podman", "pw")}}})
    assert resolve_credentials(host) == ("podman", "pw")


# --- credential helpers ------------------------------------------------------------------

def test_cred_helper_for_the_host(env: Env) -> None:
    log = fake_helper(env, "test", {HOST: ("helped", "helper-secret")})
    write_json(env.docker_config, {"credHelpers": {HOST: "test"},
                                   "auths": {HOST: {"auth": b64("plain", "pw")}}})
    found = find_credentials(HOST)
    assert found is not None
    assert found.pair == ("helped", "helper-secret")
    assert "credHelpers 'test'" in found.source and "helper-secret" not in repr(found)
    assert calls(log) == [[["get"], HOST]]


def test_cred_helper_without_an_entry_falls_back_to_auths(env: Env) -> None:
    fake_helper(env, "test", {})
    write_json(env.docker_config, {"credHelpers": {HOST: "test"},
                                   "auths": {HOST: {"auth": b64("plain", "pw")}}})
    assert resolve_credentials(HOST) == ("plain", "pw")
    write_json(env.docker_config, {"credHelpers": {HOST: "test"}})
    assert resolve_credentials(HOST) is None


def test_creds_store(env: Env) -> None:
    log = fake_helper(env, "store", {DOCKER_HUB_AUTH_KEY: ("hubuser", "hubpw"),
                                     HOST: ("reguser", "regpw")})
    write_json(env.docker_config, {"credsStore": "store",
                                   "auths": {DOCKER_HUB_AUTH_KEY: {}, HOST: {}}})
    assert resolve_credentials("docker.io") == ("hubuser", "hubpw")
    assert resolve_credentials(HOST) == ("reguser", "regpw")
    assert resolve_credentials("unknown.example") is None
    assert [c[1] for c in calls(log)] == [DOCKER_HUB_AUTH_KEY, HOST, "unknown.example"]


def test_cred_helper_beats_creds_store(env: Env) -> None:
    fake_helper(env, "store", {HOST: ("from-store", "pw")})
    fake_helper(env, "special", {HOST: ("from-helper", "pw")})
    write_json(env.docker_config, {"credsStore": "store", "credHelpers": {HOST: "special"}})
    assert resolve_credentials(HOST) == ("from-helper", "pw")


def test_missing_helper_is_named(env: Env) -> None:
    write_json(env.docker_config, {"credsStore": "nothere"})
    with pytest.raises(AuthenticationError) as e:
        resolve_credentials(HOST)
    assert "docker-credential-nothere" in str(e.value)
    assert str(env.docker_config) in str(e.value)


@pytest.mark.parametrize("script, message", [
    ("print('boom: keychain locked', file=sys.stderr); sys.exit(3)", "boom: keychain locked"),
    ("print('not json')", "malformed output"),
    ("print(json.dumps({'Username': 'only'}))", "malformed output"),
    ("print(json.dumps({'Username': '<token>', 'Secret': 'refresh'}))", "identity token"),
])
def test_failing_helpers(env: Env, script: str, message: str) -> None:
    fake_helper(env, "bad", {}, script=script)
    write_json(env.docker_config, {"credHelpers": {HOST: "bad"}})
    with pytest.raises(AuthenticationError, match=message) as e:
        resolve_credentials(HOST)
    assert "docker-credential-bad" in str(e.value) and "refresh" not in str(e.value)


def test_helpers_in_an_auth_file_too(env: Env) -> None:
    fake_helper(env, "test", {HOST: ("via-authfile", "pw")})
    auth = write_json(env.tmp / "auth.json", {"credHelpers": {HOST: "test"}})
    assert resolve_credentials(HOST, auth_file=str(auth)) == ("via-authfile", "pw")


# --- malformed files -------------------------------------------------------------------------

@pytest.mark.parametrize("content, message", [
    ("{not json", "is not valid JSON"),
    ("[]", "is not a JSON object"),
    ('{"auths": []}', "'auths' is not a JSON object"),
    ('{"credsStore": 7}', "'credsStore' is not a string"),
    ('{"auths": {"reg.example:5000": "x"}}', "is not an object"),
    ('{"auths": {"reg.example:5000": {"auth": "%%%notbase64"}}}', "is not base64"),
    ('{"auths": {"reg.example:5000": {"auth": "' + base64.b64encode(b"nocolon").decode()
     + '"}}}', "does not decode to USER:PASS"),
    ('{"auths": {"reg.example:5000": {"username": "u"}}}', "needs both"),
])
def test_malformed_files_are_named(env: Env, content: str, message: str) -> None:
    write_json(env.docker_config, content)
    with pytest.raises(InvalidInput, match=message) as e:
        resolve_credentials(HOST)
    assert str(env.docker_config) in str(e.value)
    assert "nocolon" not in str(e.value)


def test_an_explicit_auth_file_must_exist(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InvalidInput, match="does not exist"):
        resolve_credentials(HOST, auth_file=str(env.tmp / "missing.json"))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(env.tmp / "missing-too.json"))
    with pytest.raises(InvalidInput, match="missing-too.json does not exist"):
        resolve_credentials(HOST)


def test_an_empty_file_holds_no_credentials(env: Env) -> None:
    write_json(env.docker_config, "")
    assert resolve_credentials(HOST) is None


@pytest.mark.parametrize("special", ["/dev/zero", "directory", "fifo"])
def test_an_auth_file_that_is_not_a_file_is_refused_at_once(env: Env, tmp_path: Path,
                                                            special: str) -> None:
    """``--authfile /dev/zero`` used to be read without end; a FIFO without
    a writer would block."""
    path = {"/dev/zero": "/dev/zero", "directory": str(tmp_path)}.get(special)
    if path is None:
        path = str(tmp_path / "fifo")
        os.mkfifo(path)
    refused = "auth file .* (not a regular file|no process writes to)"
    with pytest.raises(InvalidInput, match=refused):
        resolve_credentials(HOST, auth_file=path)
