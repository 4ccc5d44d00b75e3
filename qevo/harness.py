"""The run harness every method shares: the work folder, its resolved config, output names
and atomic writers, and the random-number setting a run is traced under.

A work folder holds ``config.json`` (the resolved config; a different one is refused),
``checkpoint.msgpack`` or the method's own resumable state, ``history.*`` and, when the
run is done, ``results.json``; while a run is in it, ``run.lock`` (:func:`workdir_lock`: a
second run on the folder is refused). :func:`method` wraps every method's ``run(cfg,
workdir)`` so that it takes the lock and draws the same random numbers from Python as from
its command (:mod:`qevo.cli`). Every output path is checked before any work
(:func:`check_output`).

Every ``results.json`` holds ``"seconds"``: the wall seconds this call spent in each stage
of the method and ``"total"`` for the whole call (:class:`Stopwatch`); a resumed call counts
only its own time. Figures summed over every call of a resumed run are named for what they
sum (``train_seconds``: training epochs; ``coevolution.seconds``: evolution cycles).
Everything else a run writes is reproduced exactly by a resumed or multi-process run
(:func:`without_seconds` strips the wall-clock fields to compare them).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import io
import json
import os
import pathlib
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from tqdm import tqdm

from qevo import checkpoint, distributed
from qevo import config as config_lib
from qevo.checkpoint import atomic_write_bytes
from qevo.errors import CheckpointError
from qevo.files import atomic_path, unwritable
from qevo.quant import onednn

CHECKPOINT = "checkpoint.msgpack"
CONFIG = "config.json"
HISTORY = "history.jsonl"
LOCK = "run.lock"
MODEL = "model.msgpack"
RESULTS = "results.json"


# The keys every ``results.json`` holds, with the same names for every method: which method
# made the run (``method``), on which network and data, from which seed, in how many wall
# seconds and where (``device``, ``convolutions``: :func:`environment`).
ENVELOPE = ("method", "model", "dataset", "seed", "seconds", "device", "convolutions")


@dataclasses.dataclass(frozen=True)
class Stored:
    """A model of a finished run, as its method stored it (what :func:`qevo.export.exporter.load`
    exports).

    Attributes:
      variables: the model's float variables.
      bits: int32 ``[L]`` weight and activation widths, or ``None`` for a float network.
      kernels: ``{module path: kernel}`` the method stored itself (integer levels, shared
        codebooks); ``{}`` where the export quantizes the float kernels at ``bits``.
      test_accuracy: the test accuracy the run reported for it.
      arithmetic: ``"integer"`` where the model's own forward pass is integer arithmetic.
    """

    variables: dict
    bits: Any
    kernels: dict
    test_accuracy: float
    arithmetic: str = "float"


@dataclasses.dataclass(frozen=True)
class Method:
    """One compression method, as the command layer, the export and the registry
    (:mod:`qevo.methods`) see it.

    Attributes:
      name: the command's module, ``python -m qevo.<name>``, and the ``method`` that
        ``config.json`` and ``results.json`` record.
      defaults: ``defaults() -> ConfigDict``, every key of the method's config.
      validate: ``validate(cfg) -> cfg``, raising ``ConfigError`` in one line.
      run: ``run(cfg, workdir, **inputs) -> results`` (wrapped by :func:`method`).
      models: ``models(workdir, cfg) -> names`` of the stored models of a finished run, the
        default first.
      load: ``load(workdir, cfg, name, model, template, results) -> Stored``: the stored
        model ``name`` of the network ``model``, its variables read into the structure of
        ``template``, at the accuracy ``results`` (the run's ``results.json``) reports.
      section: the config section only this method has, which names the method of a run
        recorded before ``config.json`` named it (``None``: the method without one).
      several: whether a run holds several models, so that exporting one needs its name.
    """

    name: str
    defaults: Callable[[], ml_collections.ConfigDict]
    validate: Callable[[ml_collections.ConfigDict], ml_collections.ConfigDict]
    run: Callable[..., dict]
    models: Callable[[pathlib.Path, ml_collections.ConfigDict], list[str]]
    load: Callable[[pathlib.Path, ml_collections.ConfigDict, str, Any, dict, dict], Stored]
    section: str | None = None
    several: bool = False


def method(name: str, defaults: Callable[[], ml_collections.ConfigDict],
           resolve: Callable[..., ml_collections.ConfigDict] | None = None):
    """Decorate the method ``name``'s ``run(cfg, workdir, **inputs) -> results`` whose keys and
    defaults ``defaults()`` gives: each call holds ``workdir``'s lock (:func:`workdir_lock`: a
    folder another live run holds is refused) while it prepares the folder
    (:func:`prepare_workdir`: it writes ``config.json`` with the method's name, and refuses a
    folder that holds a run of another config or method) and runs under the config's
    random-number setting (``cfg.threefry_partitionable``, recorded in ``config.json``). The
    results ``run`` returns are written to ``results.json`` with the envelope every method
    shares (:data:`ENVELOPE`: ``method`` and ``seed`` added here; ``run`` gives the rest). So a
    run from Python writes the same work folder, with the same random streams, as the
    command. ``workdir`` may be a str; keyword arguments (a user's ``model=``, ``data=``) pass
    through. ``resolve(cfg, **inputs) -> cfg``, where given, is the config the run records and
    gets, with what the inputs add to it (the search's names of a user's objectives)."""

    def decorate(run: Callable[..., dict]):
        @functools.wraps(run)
        def wrapped(cfg: ml_collections.ConfigDict, workdir, **inputs) -> dict:
            cfg = resolve(cfg, **inputs) if resolve is not None else cfg
            folder = pathlib.Path(workdir)
            with workdir_lock(folder):
                prepare_workdir(folder, cfg, defaults(), name)
                with random_streams(cfg):
                    results = {"method": name, "seed": cfg.seed, **run(cfg, folder, **inputs)}
                missing = [key for key in ENVELOPE if key not in results]
                assert not missing, f"qevo.{name}'s results lack {missing}"
                write_json(folder / RESULTS, results)
            return results

        return wrapped

    return decorate


def read_config(path: pathlib.Path) -> tuple[str | None, dict]:
    """``(method, config)`` of a run's ``config.json``: the method that made it (``None`` for a
    run recorded before ``config.json`` named it) and its resolved config, with renamed keys
    translated (:func:`qevo.config.upgrade`).

    Raises:
      CheckpointError: the file is missing or corrupt.
    """
    if not path.is_file():
        raise CheckpointError(f"{path.parent} has no {path.name}: it is not the work folder of a qevo run")
    try:
        saved = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is corrupt ({e}); delete {path.parent} to start over") from e
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path} is corrupt (not a JSON object); delete {path.parent} to start over")
    name = saved.pop("method", None)
    return name, config_lib.upgrade(saved)


def float_folder(workdir: pathlib.Path, cfg: ml_collections.ConfigDict) -> pathlib.Path:
    """Where a run's float model is: ``float_from``, else ``<workdir>/float``."""
    return pathlib.Path(cfg.float_from) if cfg.get("float_from") else workdir / "float"


def load_variables(path: pathlib.Path, template: dict) -> dict:
    """The variables stored at ``path`` (a ``model.msgpack``), in the structure of ``template``."""
    variables, _ = checkpoint.load(path, template)
    return variables


def stored_float(workdir: pathlib.Path, cfg: ml_collections.ConfigDict, template: dict, results: dict) -> Stored:
    """The float model a run started from (:func:`float_folder`), at the test accuracy its
    ``results.json`` reports under ``"float"``."""
    return Stored(load_variables(float_folder(workdir, cfg) / MODEL, template), None, {},
                  float(results["float"]["test_accuracy"]))


class StepLog:
    """The resumable step loop of a run folder: ``checkpoint.msgpack`` holds the state after
    the last finished step (its meta ``{unit: steps}``), ``history.jsonl`` the records up to
    it. :meth:`commit` writes the history, then the checkpoint, both atomically, so a kill at
    any moment leaves a folder that :meth:`resume` continues from the last checkpoint (later
    records belong to the interrupted step and are dropped, :func:`qevo.checkpoint.read_history`).

    ``workdir=None`` keeps nothing (a run from Python without a folder). ``step_key`` names
    the record field that holds the step, for histories of several records per step.
    """

    def __init__(self, workdir: pathlib.Path | None, unit: str, step_key: str | None = None, log=None):
        self.workdir, self.unit, self.step_key, self.log = workdir, unit, step_key, log

    def resume(self, state):
        """``(state, history)``: the checkpointed state (``state`` gives the structure) and
        its history, or ``(state, [])`` when there is nothing to resume."""
        if self.workdir is None or not (self.workdir / CHECKPOINT).exists():
            return state, []
        state, meta = checkpoint.load(self.workdir / CHECKPOINT, state)
        steps = meta[self.unit]
        history = checkpoint.read_history(self.workdir / HISTORY, steps, f"{self.unit}s", self.step_key)
        if self.log:
            self.log(f"resuming {self.workdir} after {self.unit} {steps}")
        return state, history

    def commit(self, state, history: list[dict], steps: int) -> None:
        """Record ``steps`` finished steps: ``history`` (every record so far), then ``state``."""
        if self.workdir is not None:
            checkpoint.write_jsonl(self.workdir / HISTORY, history)
            checkpoint.save(self.workdir / CHECKPOINT, state, {self.unit: steps})


def environment(model, variables: dict, image_shape: tuple[int, ...], batch_size: int, precision: str) -> dict:
    """Where a run computes, for its ``results.json``: ``{"device": the first device's kind,
    "convolutions": what runs the float network's convolutions}`` (:func:`qevo.quant.onednn.record`
    of its training forward pass on ``batch_size`` images of ``image_shape`` (HWC), traced,
    not run). Where ``precision`` (``model.precision``) asks for bfloat16 and the kernels of
    this machine keep float32, says so in one line on stderr."""
    x = jax.ShapeDtypeStruct((batch_size, *image_shape), jax.numpy.float32)
    forward = lambda v, x: model.apply(v, x, None, train=True, mutable=["batch_stats"],  # noqa: E731
                                       rngs={"dropout": jax.random.key(0)})
    convolutions = onednn.record(forward, variables, x)
    ran = convolutions.get("precision", precision)
    if ran != precision:
        print(f"qevo: model.precision={precision!r} asked for, but this CPU's oneDNN kernels compute the "
              f"convolutions in {ran} ({', '.join(convolutions['implementations'])}); results.json records it",
              file=sys.stderr, flush=True)
    return {"device": jax.devices()[0].device_kind, "convolutions": convolutions}


def progress(total: int, initial: int, desc: str, show: bool = True) -> Progress:
    """The progress of a run's ``total`` steps, ``initial`` of them done before this call
    (:class:`Progress`); ``show=False`` shows nothing (a loop run from Python without a log)."""
    return Progress(total, initial, desc, show)


class Progress:
    """The progress of a run's steps, the one every method's step loop reports through.

    On a terminal, a bar on stderr; on any stderr (a log written to a file or a pipe gets no
    bar redraws), the line each finished step passes to :meth:`step`, followed by the
    estimated time left: the mean time of this call's steps times the steps left. The first
    step of a call compiles its programs, so once a second step is measured the first is
    left out of the mean.
    """

    def __init__(self, total: int, initial: int, desc: str, show: bool = True,
                 clock: Callable[[], float] = time.perf_counter):
        self.total, self.initial, self.done, self.show, self.clock = total, initial, initial, show, clock
        self.bar = tqdm(total=total, initial=initial, desc=desc, file=sys.stderr, disable=None if show else True)
        self._times = [clock()]  # when this call began, then when its first step ended

    def step(self, line: str) -> None:
        """One more step is done: advance the bar and write ``line`` with the time left."""
        self.done += 1
        now = self.clock()
        if len(self._times) == 1:
            self._times.append(now)
        self.bar.update(1)
        if self.show:
            self.bar.write(line + (f"  ({duration(self.seconds_left(now))} left)" if self.done < self.total else ""),
                           file=sys.stderr)

    def seconds_left(self, now: float) -> float:
        """The estimated seconds the steps left take, from this call's steps up to ``now``."""
        begun, first = self._times
        steps = self.done - self.initial
        per_step = first - begun if steps == 1 else (now - first) / (steps - 1)
        return per_step * (self.total - self.done)

    def close(self) -> None:
        self.bar.close()


def duration(seconds: float) -> str:
    """``seconds`` as a person reads a time: ``42 s``, ``7 min 05 s``, ``2 h 08 min``."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min"


class Stopwatch:
    """Wall seconds of a run's stages in this call: ``with watch.stage("search"): ...``;
    :meth:`seconds` gives ``{stage: s, ..., "total": s since the watch was made}``."""

    def __init__(self):
        self._start = time.perf_counter()
        self._stages: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self._stages[name] = self._stages.get(name, 0.0) + time.perf_counter() - start

    def seconds(self) -> dict[str, float]:
        return {**{k: round(v, 2) for k, v in self._stages.items()},
                "total": round(time.perf_counter() - self._start, 2)}


def without_seconds(record):
    """``record`` (a ``results.json`` or history record, nested dicts) without its wall-clock
    fields, the keys that name seconds: what a resumed run reproduces exactly."""
    if isinstance(record, dict):
        return {k: without_seconds(v) for k, v in record.items() if "seconds" not in k}
    return record


@contextlib.contextmanager
def random_streams(cfg: ml_collections.ConfigDict):
    """Trace under ``cfg.threefry_partitionable`` (False: JAX's original threefry bit
    layout, which compiles fast on the CPU; True: the partitionable one)."""
    with jax.threefry_partitionable(bool(cfg.threefry_partitionable)):
        yield


def check_output(path: pathlib.Path, flag: str, folder: bool = False) -> pathlib.Path:
    """Refuse, before any work, an output path this process cannot write: ``path`` (a folder
    with ``folder``, else a file; missing folders above it count as writable where they can
    be made), named by its command-line ``flag`` (``--workdir``, ``--out``). The one check of
    every command's outputs (:func:`qevo.files.unwritable`). Returns ``path``.

    Raises:
      CheckpointError: ``path`` cannot be written, saying why.
    """
    problem = unwritable(path, flag, folder)
    if problem is not None:
        raise CheckpointError(problem)
    return path


_held: set[pathlib.Path] = set()  # the lock files this process holds


@contextlib.contextmanager
def workdir_lock(workdir: pathlib.Path):
    """Hold ``workdir``'s lock for the block: ``run.lock`` (JSON ``{"pid", "host"}``), made
    before anything else is written there (the folder is checked, :func:`check_output`, and
    made) and removed when the block ends, normally or by an exception.

    A lock another live process holds (same host, its pid running; any pid on another host,
    which cannot be checked from here) refuses the run. A lock whose process is gone (same
    host, pid not running: a killed run) is stale: this run takes it over and says so in one
    line on stderr. A lock this process already holds is entered again (the command holds it
    around its method's ``run``, which takes it too). In a run of several processes only
    the one that writes (:func:`qevo.distributed.is_writer`) takes it.

    Raises:
      CheckpointError: another run holds the folder (naming its pid and host), the lock file
        is not a qevo lock, or the folder cannot be written.
    """
    lock = workdir.resolve() / LOCK
    if lock in _held:
        yield
        return
    check_output(workdir, "--workdir", folder=True)
    if not distributed.is_writer():
        yield
        return
    workdir.mkdir(parents=True, exist_ok=True)
    _take(lock)
    _held.add(lock)
    try:
        yield
    finally:
        _held.discard(lock)
        lock.unlink(missing_ok=True)


def _take(lock: pathlib.Path) -> None:
    """Make ``lock`` naming this process, taking over a stale one (:func:`workdir_lock`)."""
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _holder(lock)
            if holder is None:
                continue  # released meanwhile
            pid, host = holder["pid"], holder["host"]
            if host != me["host"] or _alive(pid):
                raise CheckpointError(
                    f"{lock.parent} is in use by another run (pid {pid} on {host}, {lock}); wait for it to end or "
                    f"pass another --workdir (if pid {pid} is no qevo run, delete {lock})") from None
            print(f"qevo: {lock.parent} was locked by pid {pid}, which is no longer running; taking it over",
                  file=sys.stderr, flush=True)
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me) + "\n")
        return
    raise CheckpointError(f"{lock} changed hands while this run took it; rerun the command")


def _holder(lock: pathlib.Path) -> dict | None:
    """``{"pid", "host"}`` of ``lock``, or None where it has just gone."""
    try:
        holder = json.loads(lock.read_text())
        if isinstance(holder, dict) and isinstance(holder.get("pid"), int) and isinstance(holder.get("host"), str):
            return holder
        problem = "no pid and host"
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        problem = str(e)
    raise CheckpointError(f"{lock} is not a qevo lock ({problem}); if no run is using {lock.parent}, delete it")


def _alive(pid: int) -> bool:
    """Whether process ``pid`` of this host is running."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def prepare_workdir(workdir: pathlib.Path, cfg: ml_collections.ConfigDict,
                    defaults: ml_collections.ConfigDict | None = None, name: str | None = None) -> pathlib.Path:
    """Create ``workdir`` and write ``config.json``: the method ``name`` and the resolved config.
    A different saved config or method is an error once the folder holds anything else (a
    run's state); a folder that holds only ``config.json`` (a run that stopped before its
    first output) takes the new config. A key that the saved config lacks (one added to qevo
    since the run began) counts as unchanged where ``cfg`` holds its value in ``defaults``
    (the command's keys and defaults), which keep the earlier behaviour; so does a saved
    config without a method (one recorded before ``config.json`` named it). A path that is
    not a writable folder is an error (:func:`workdir_lock`, which :func:`method` holds around
    this, checks it first); the lock file is not a run's state."""
    resolved = config_lib.to_dict(cfg)
    saved = workdir / CONFIG
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        if saved.exists():
            before, previous = read_config(saved)
            started = any(p.name not in (CONFIG, LOCK) for p in workdir.iterdir())
            if started and before is not None and name is not None and before != name:
                raise config_lib.ConfigError(f"{workdir} holds a qevo.{before} run, not a qevo.{name} one; "
                                             "pass a new --workdir")
            now = json.loads(json.dumps(resolved))
            known = json.loads(json.dumps(config_lib.to_dict(defaults))) if defaults is not None else {}
            if started and fill_defaults(previous, known) != now:
                raise config_lib.ConfigError(f"{workdir} holds a run with a different config ({saved}); "
                                             "pass a new --workdir or delete that folder")
        write_json(saved, {**({"method": name} if name is not None else {}), **resolved})
    except OSError as e:
        raise CheckpointError(f"--workdir {workdir} is not a writable folder ({e.strerror}); "
                              "pass a folder you can write to") from e
    return workdir


def fill_defaults(saved: dict, defaults: dict) -> dict:
    """``saved`` (a run's ``config.json`` as a dict) with each key it lacks, one added to qevo
    since the run began, at its value in ``defaults`` (the command's keys and defaults,
    which keep the behaviour the run had: a key is added with the default that does)."""
    out = dict(saved)
    for key, default in defaults.items():
        if key not in out:
            out[key] = default
        elif isinstance(default, dict) and isinstance(out[key], dict):
            out[key] = fill_defaults(out[key], default)
    return out


def write_json(path: pathlib.Path, obj) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


@contextlib.contextmanager
def figure(path: pathlib.Path, size: tuple[float, float] = (6, 4)):
    """Yield a matplotlib axes (``size`` in inches); when the block ends its figure is laid
    out and saved to ``path`` as a 120 dpi PNG, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    try:
        yield ax
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(fig)


def read_rows(path: pathlib.Path) -> dict[str, dict]:
    """The rows of a CSV that :func:`write_csv` wrote (``final.csv``), as dicts of text by
    their ``name`` column.

    Raises:
      CheckpointError: the file is corrupt (not CSV, or a row without a name).
    """
    try:
        with path.open(newline="") as f:
            return {row["name"]: row for row in csv.DictReader(f)}
    except (csv.Error, KeyError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is corrupt ({type(e).__name__}: {e}); rerun the command that wrote it") from e


def write_csv(path: pathlib.Path, rows: list[dict], columns: list[str]) -> None:
    """Write ``rows`` (dicts) as CSV with ``columns``, atomically; lists (bit widths) as space-joined text."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: " ".join(str(int(b)) for b in v) if isinstance(v, list) else v for k, v in r.items()})
    atomic_write_bytes(path, buf.getvalue().encode())
