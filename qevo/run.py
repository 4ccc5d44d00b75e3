"""The run harness every command shares: arguments, work folder, resolved config, outputs.

``python -m qevo.<command> --config configs/x.py [--config.key=value ...] [--workdir DIR]``
loads and validates the config, makes the work folder (default ``runs/<config name>``),
writes ``config.json`` (the resolved config) and refuses to resume a folder whose saved
config differs. Errors that a user can fix end the command with one line, exit status 2.

Compiled programs are kept in JAX's persistent compilation cache (``$JAX_COMPILATION_CACHE_DIR``,
else ``<qevo cache>/jax``, see :func:`qevo.data.default_cache_dir`), so a rerun or a resumed
run skips most compilation.
"""

from __future__ import annotations

import json
import pathlib
import sys
from collections.abc import Callable

import jax
import ml_collections

from qevo import config as config_lib
from qevo.checkpoint import CheckpointError, atomic_write_bytes
from qevo.data import DataError, default_cache_dir

USER_ERRORS = (config_lib.ConfigError, DataError, CheckpointError, ValueError)


def parse_args(argv: list[str], prog: str) -> tuple[pathlib.Path, list[str], pathlib.Path | None]:
    """Split ``argv`` into (config path, ``key=value`` overrides, workdir or None)."""
    usage = f"usage: python -m {prog} --config configs/<name>.py [--config.key=value ...] [--workdir DIR]"
    path, overrides, workdir = None, [], None
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help"):
            print(usage)
            sys.exit(0)
        if "=" in arg and not arg.startswith("--config."):
            arg, value = arg.split("=", 1)
            args.insert(0, value)
        if arg.startswith("--config."):
            overrides.append(arg[len("--config."):] if "=" in arg else f"{arg[len('--config.'):]}={args.pop(0)}")
        elif arg in ("--config", "--workdir") and args:
            value = pathlib.Path(args.pop(0))
            path, workdir = (value, workdir) if arg == "--config" else (path, value)
        else:
            raise config_lib.ConfigError(f"unexpected argument {arg!r}; {usage}")
    if path is None:
        raise config_lib.ConfigError(f"--config is required; {usage}")
    return path, overrides, workdir


def prepare_workdir(workdir: pathlib.Path, cfg: ml_collections.ConfigDict) -> pathlib.Path:
    """Create ``workdir`` and write ``config.json``; a different saved config is an error."""
    workdir.mkdir(parents=True, exist_ok=True)
    resolved = config_lib.to_dict(cfg)
    saved = workdir / "config.json"
    if saved.exists() and json.loads(saved.read_text()) != json.loads(json.dumps(resolved)):
        raise config_lib.ConfigError(
            f"{workdir} holds a run with a different config ({saved}); pass a new --workdir or delete that folder"
        )
    write_json(saved, resolved)
    return workdir


def write_json(path: pathlib.Path, obj) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def main(prog: str, run: Callable[[ml_collections.ConfigDict, pathlib.Path], dict], validate, argv=None) -> int:
    """Entry point shared by the commands: parse, validate, prepare the folder, run.

    Args:
      prog: module name for messages (``qevo.train``).
      run: ``run(config, workdir) -> results dict`` (printed as JSON at the end).
      validate: ``validate(config) -> config``, raising ``ConfigError``.
      argv: arguments (default ``sys.argv[1:]``).

    Returns:
      Exit status: 0 on success, 2 on a user error (one line on stderr).
    """
    jax.config.update("jax_threefry_partitionable", False)  # fast CPU compiles of PRNG code
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(default_cache_dir() / "jax"))
    try:
        path, overrides, workdir = parse_args(sys.argv[1:] if argv is None else argv, prog)
        cfg = validate(config_lib.load(path, overrides))
        workdir = prepare_workdir(workdir or pathlib.Path("runs") / path.stem, cfg)
        results = run(cfg, workdir)
    except USER_ERRORS as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(results, indent=2, sort_keys=True))
    return 0
