"""The command layer: ``python -m qevo.<method> --config configs/x.py [--config.key=value ...]
[--workdir DIR]``.

It joins a multi-process run where the environment asks for one (:mod:`qevo.distributed`),
parses the flags, loads and validates the config, sets the process-wide compilation cache
and runs the method in its work folder (default ``runs/<config name>``; the method prepares
it, :func:`qevo.harness.method`), holding the folder's lock from before its first line
(:func:`qevo.harness.workdir_lock`: the folder is checked, and a folder another run holds
refused, before any work). A config file sized for an accelerator (:func:`qevo.config.sized_for`)
run on a CPU is said so in one line at start, with the time its float training takes here
(:func:`float_training_seconds`) and the CPU config to use instead. Errors a user can fix
(:class:`qevo.errors.QevoError`) and device memory running out end the command with one
line on stderr and exit status 2; anything else is a bug and keeps its traceback. Only the
``__main__`` hooks of the method modules import this module.

Compiled programs are kept in JAX's persistent compilation cache (``$JAX_COMPILATION_CACHE_DIR``,
else ``<qevo cache>/jax``, see :func:`qevo.data.datasets.default_cache_dir`), so a rerun or a resumed
run skips most compilation.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
import time
from collections.abc import Callable

import jax
import ml_collections

from qevo import config as config_lib
from qevo import distributed, harness
from qevo.data.datasets import default_cache_dir
from qevo.errors import ConfigError, PopulationMemoryError, QevoError
from qevo.evolution.population import is_out_of_memory
from qevo.harness import MODEL
from qevo.models import inputs as model_inputs
from qevo.train import trainer as training

USER_ERRORS = (QevoError,)

# Training steps timed for the estimate of a float training (:func:`float_training_seconds`).
TIMED_STEPS = 3

# The settings that decide how much device memory a command's programs take.
MEMORY_KEYS = (
    "population_size", "search.strategy", "search.chunk_size", "search.qat_batch_size",
    "sharing.strategy", "coevolve.population_size", "coevolve.strategy", "coevolve.chunk_size",
    "coevolve.batch_size", "train.batch_size", "train.eval_batch_size",
)


def parse_args(argv: list[str], prog: str) -> tuple[pathlib.Path, list[str], pathlib.Path | None]:
    """Split ``argv`` into (config path, ``key=value`` overrides, workdir or None).

    ``-h``/``--help`` prints the usage and, with ``--config``, every key of that config with
    its value after the overrides, then exits."""
    usage = f"usage: python -m {prog} --config configs/<name>.py [--config.key=value ...] [--workdir DIR]"
    path, overrides, workdir, wants_help = None, [], None, False
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help"):
            wants_help = True
            continue
        if "=" in arg and not arg.startswith("--config."):
            arg, value = arg.split("=", 1)
            args.insert(0, value)
        if arg.startswith("--config."):
            overrides.append(arg[len("--config."):] if "=" in arg else f"{arg[len('--config.'):]}={args.pop(0)}")
        elif arg in ("--config", "--workdir") and args:
            value = pathlib.Path(args.pop(0))
            path, workdir = (value, workdir) if arg == "--config" else (path, value)
        else:
            raise ConfigError(f"unexpected argument {arg!r}; {usage}")
    if wants_help:
        print(usage)
        if path is not None:
            print(f"\nthe keys of {path} with the overrides given, each settable as --config.key=value:")
            for key, value in sorted(config_lib.flatten(config_lib.load(path, overrides)).items()):
                print(f"  {key} = {value!r}")
        sys.exit(0)
    if path is None:
        raise ConfigError(f"--config is required; {usage}")
    return path, overrides, workdir


def memory_settings(cfg: ml_collections.ConfigDict | None, workdir: pathlib.Path | None) -> str:
    """The settings of ``cfg`` that decide device memory, as the flags that set them, and
    where a float model trained by this run can be reused from (a changed config needs a new
    work folder)."""
    if cfg is None:
        return "no config was loaded"
    flat = config_lib.flatten(cfg)
    flags = [f"--config.{key}={flat[key]}" for key in MEMORY_KEYS if key in flat]
    out = f"memory settings now: {' '.join(flags)}" if flags else "no memory settings in this config"
    if (workdir is not None and "float_from" in flat and flat["float_from"] is None
            and (workdir / "float" / MODEL).is_file()):
        out += f"; with a new --workdir, --config.float_from={workdir / 'float'} reuses this run's float model"
    return out


def float_training_seconds(cfg: ml_collections.ConfigDict) -> float:
    """An estimate of the wall seconds ``cfg``'s float training takes on this machine: the
    run's own training step (its data, model and ``train`` settings, float) compiled for the
    first :data:`TIMED_STEPS` mini-batches (at most), then timed on them, times the
    mini-batches of every epoch. Compilation and evaluation are left out, and a step's time varies with the
    machine's load: an estimate, not a promise. On this process's own devices."""
    inputs = model_inputs.resolve_inputs(cfg)
    ds, size = inputs.ds, cfg.train.batch_size
    steps = max(1, min(TIMED_STEPS, ds.train_images.shape[0] // size))
    few = dataclasses.replace(ds, train_images=ds.train_images[: steps * size],
                              train_labels=ds.train_labels[: steps * size])
    trainer = training.Trainer(cfg, few, inputs.model, quantized=False, devices=tuple(jax.local_devices()),
                            loss=inputs.loss)
    state = trainer.init_state(training.initial_variables(cfg, few, inputs.model, None, jax.random.key(cfg.seed)))
    # The first call compiles for the initial state, the second for the state the first returns
    # (placed on the devices' mesh): the third is timed.
    for key in jax.random.split(jax.random.key(cfg.seed), 3):
        start = time.perf_counter()
        state, loss = trainer.epoch(state, None, key, few.train_images, few.train_labels)
        jax.block_until_ready(loss)
    per_step = (time.perf_counter() - start) / steps
    return per_step * (ds.train_images.shape[0] // size) * cfg.train.epochs


def sizing_note(prog: str, path: pathlib.Path, cfg: ml_collections.ConfigDict) -> str | None:
    """The line a command starts with where its config file is sized for an accelerator
    (:func:`qevo.config.sized_for`) and this process computes on a CPU: that, the time its
    float training takes here (unless ``float_from`` names a trained one) and the CPU config
    to use instead. None elsewhere. It never refuses the run."""
    size, cpu_config = config_lib.sized_for(path)
    if size != "accelerator" or jax.default_backend() != "cpu":
        return None
    if cfg.get("float_from") is None:
        cost = (f"its float training ({cfg.train.epochs} epochs) takes about "
                f"{harness.duration(float_training_seconds(cfg))} here (from its training step, timed)")
    else:
        cost = f"its float model comes from float_from={cfg.float_from}"
    instead = (f"use {cpu_config} instead" if cpu_config is not None
               else "no CPU-sized config of it exists: lower train.epochs and the method's budget to shorten it")
    return f"{prog}: {path} is sized for an accelerator and this is a CPU: {cost}; {instead}"


def main(prog: str, run: Callable[[ml_collections.ConfigDict, pathlib.Path], dict], validate, argv=None) -> int:
    """Entry point shared by the commands: parse, validate, run.

    Args:
      prog: module name for messages (``qevo.train``).
      run: ``run(config, workdir) -> results dict`` (a :func:`qevo.harness.method`, which
        prepares the folder; printed as JSON at the end), called holding the folder's lock.
      validate: ``validate(config) -> config``, raising ``ConfigError``.
      argv: arguments (default ``sys.argv[1:]``).

    Returns:
      Exit status: 0 on success, 2 on a user error or when the devices run out of memory
      (one line on stderr; for memory, the config settings that decide it).
    """
    if not jax.config.jax_compilation_cache_dir:  # pyright: ignore[reportAttributeAccessIssue]  # a jax flag: dynamic
        jax.config.update("jax_compilation_cache_dir", str(default_cache_dir() / "jax"))
    cfg = workdir = None
    try:
        distributed.initialize()
        path, overrides, workdir = parse_args(sys.argv[1:] if argv is None else argv, prog)
        cfg = validate(config_lib.load(path, overrides))
        workdir = workdir or pathlib.Path("runs") / path.stem
        with harness.workdir_lock(workdir):
            note = sizing_note(prog, path, cfg) if distributed.is_writer() else None
            if note is not None:
                print(note, file=sys.stderr, flush=True)
            results = run(cfg, workdir)
    except USER_ERRORS as e:
        settings = f"; {memory_settings(cfg, workdir)}" if isinstance(e, PopulationMemoryError) else ""
        print(f"{prog}: error: {e}{settings}", file=sys.stderr)
        return 2
    except Exception as e:
        if is_out_of_memory(e):
            print(f"{prog}: error: out of device memory ({str(e).splitlines()[0]}); lower the population or batch "
                  f"sizes, or score fewer individuals at once (strategy=map, a small chunk_size); "
                  f"{memory_settings(cfg, workdir)}", file=sys.stderr)
            return 2
        if not distributed.lost_peer(e):
            raise
        print(f"{prog}: error: another process of this run stopped ({str(e).splitlines()[0]}); "
              f"rerun every process to resume from {workdir}", file=sys.stderr, flush=True)
        os._exit(2)  # at once: JAX's exit handler would wait for the lost process, then abort
    print(json.dumps(results, indent=2, sort_keys=True))
    return 0
