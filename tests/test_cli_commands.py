"""The command tree: every command is reachable by name, each command's
module is loaded only when it is used (``layer convert`` of a local file
loads neither the registry client nor the profiler), and a wrong name is
one line and exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest

from conftest import REPO, Spec, build_tar, run_cli
from estargz.cli import main

COMMANDS = {
    (): ["convert", "doctor", "layer", "optimize", "soci"],
    ("layer",): ["convert", "extract", "ls", "toc", "verify"],
    ("soci",): ["create", "index", "ztoc"],
}


@pytest.mark.parametrize("path", list(COMMANDS))
def test_every_command_resolves(path: tuple[str, ...]) -> None:
    group: click.Command = main
    for name in path:
        assert isinstance(group, click.Group)
        found = group.get_command(click.Context(group), name)
        assert found is not None, name
        group = found
    assert isinstance(group, click.Group)
    ctx = click.Context(group)
    assert group.list_commands(ctx) == COMMANDS[path]
    for name in COMMANDS[path]:
        command = group.get_command(ctx, name)
        assert isinstance(command, click.Command) and command.name == name


# What `layer convert` of a local layer must not load: the registry client
# (requests), the profiler (jinja2 for its report) and the SOCI commands.
_HEAVY = ("requests", "profiler", "jinja2", "estargz.registry.client", "estargz.cli.soci",
          "estargz.cli.optimize", "estargz.cli.image", "estargz.cli.layerread")

_PROBE = """
import sys
from estargz.cli import main
try:
    main(sys.argv[1:], prog_name="estargz")
except SystemExit as e:
    code = e.code
print("LOADED", *sorted(m for m in {heavy!r} if m in sys.modules), "EXIT", code)
"""


def _loaded(*args: str) -> tuple[list[str], str]:
    p = subprocess.run([sys.executable, "-c", _PROBE.format(heavy=_HEAVY), *args],
                       capture_output=True, text=True, cwd=REPO, check=False)
    line = [w for w in p.stdout.splitlines() if w.startswith("LOADED")][-1].split()
    return line[1:line.index("EXIT")], line[-1]


def test_layer_convert_loads_only_what_it_uses(tmp_path: Path) -> None:
    src = tmp_path / "in.tar"
    src.write_bytes(build_tar([Spec("etc/hostname", data=b"h\n")]))
    loaded, code = _loaded("layer", "convert", str(src), str(tmp_path / "out"), "--quiet")
    assert code == "0" and (tmp_path / "out").stat().st_size > 0
    assert loaded == []
    # The same probe sees a command that does load them.
    loaded, code = _loaded("layer", "verify", "--help")
    assert code == "0" and "requests" in loaded and "estargz.cli.layerread" in loaded


@pytest.mark.parametrize("args,message", [
    (["nosuch"], "No such command 'nosuch'."),
    (["layer", "nosuch"], "No such command 'nosuch'."),
])
def test_unknown_command_is_one_line(args: list[str], message: str) -> None:
    r = run_cli(*args)
    assert r.code == 2
    assert r.err.splitlines() == [f"estargz: error: {message}"]
