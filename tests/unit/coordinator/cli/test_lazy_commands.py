"""``fleetwave`` imports a command's module only when that command is asked for: the map it
does so by (``base.COMMANDS``) must name every command each module registers, and only those."""

from __future__ import annotations

import importlib
import subprocess
import sys

from click.testing import CliRunner

from coordinator.cli import base, cli


def test_the_map_names_each_command_with_the_module_that_registers_it() -> None:
    for module in sorted(set(base.COMMANDS.values())):
        importlib.import_module(f"coordinator.cli.{module}")
    registered = {name: command.callback.__module__.rsplit(".", 1)[-1]
                  for name, command in cli.commands.items() if command.callback is not None}
    assert registered == base.COMMANDS


def test_help_lists_every_command() -> None:
    out = CliRunner().invoke(cli, ["--help"]).output
    for name in base.COMMANDS:
        assert f"  {name} " in out, name


def test_a_command_imports_its_own_module_only() -> None:
    """A fresh interpreter running ``deploy --help`` imports no other command's module (so,
    not the auth commands' cryptography, nor the daemon)."""
    code = ("import sys\nfrom coordinator.cli import main\n"
            "try:\n    main(['deploy', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.startswith('coordinator.cli.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    loaded = eval(out.strip().splitlines()[-1])
    others = {f"coordinator.cli.{m}" for m in base.COMMANDS.values()} - {
        "coordinator.cli.rollout_cmds"}
    assert not others & set(loaded), loaded


def test_deploy_imports_rich_only_to_draw() -> None:
    """``deploy`` (as ``-o json`` and a CI log run it) imports no rich: ~20 ms of its start;
    the table it draws on a terminal imports it then."""
    code = ("import sys\nfrom coordinator.cli import main\n"
            "try:\n    main(['deploy', '--help'])\nexcept SystemExit:\n    pass\n"
            "print('rich' in sys.modules)\n"
            "from coordinator.cli.render import status_renderable\n"
            "status_renderable({'id': 'r', 'service': 's', 'version': '2', 'state': 'running',"
            " 'strategy': 'rolling', 'waves': [], 'nodes': {}})\n"
            "print('rich' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert out.strip().splitlines()[-2:] == ["False", "True"], out[-300:]


def test_the_objects_of_the_imports_are_frozen_before_the_last_collection() -> None:
    """The interpreter's exit does not walk every object the imports made (``gc.freeze`` at
    exit: 25-60 ms of every command's end): a hook registered before the CLI's import runs
    after its freeze (atexit runs the last registered first) and sees the objects frozen."""
    code = ("import atexit, gc\n"
            "atexit.register(lambda: print('frozen', gc.get_freeze_count()))\n"
            "from coordinator.cli import main\n"
            "try:\n    main(['deploy', '--help'])\nexcept SystemExit:\n    pass\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    frozen = int(out.strip().splitlines()[-1].split()[-1])
    assert frozen > 10_000, out[-200:]


def test_a_command_imports_no_package_metadata() -> None:
    """``deploy`` does not import ``importlib.metadata`` (zipfile, csv, email: ~9 ms of its
    start), which nats-py would for its own version; the bus names that version itself, and
    ``--version`` still reads fleetwave's."""
    code = ("import sys\nfrom coordinator.cli import main\n"
            "try:\n    main(['deploy', '--help'])\nexcept SystemExit:\n    pass\n"
            "import nats.aio.client\n"
            "print('importlib.metadata' in sys.modules, nats.aio.client.__version__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    loaded, version = out.strip().splitlines()[-1].split()
    assert loaded == "False" and version != "0.0.0" and version[0].isdigit(), out[-300:]
    out = subprocess.run([sys.executable, "-c", "from coordinator.cli import main; main()",
                          "--version"], capture_output=True, text=True, timeout=60).stdout
    assert "0.1" in out, out


def test_deploy_checks_a_spec_without_the_engine() -> None:
    """``deploy`` checks its spec with the strategies (``strategies.validate``), which import
    ``core.node_table``, not the engine's events and commands (``core.engine_types``: 6-9 ms of
    dataclasses)."""
    code = ("import sys\nfrom coordinator.cli import main\n"
            "try:\n    main(['deploy', '--help'])\nexcept SystemExit:\n    pass\n"
            "print('coordinator.strategies' in sys.modules,"
            " 'coordinator.core.engine_types' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert out.strip().splitlines()[-1] == "True False", out[-300:]
