"""Joining a run of several processes (hosts) with JAX's multi-controller runtime.

Every process runs the same command; :func:`initialize` makes each one a member of the
same JAX cluster, after which ``jax.devices()`` lists the devices of every process and the
population axis is laid over all of them (:func:`qevo.evolution.population.population_map`).

How the processes find each other:

* explicitly, from the environment: ``QEVO_COORDINATOR`` (``host:port`` of process 0),
  ``QEVO_NUM_PROCESSES`` and ``QEVO_PROCESS_ID`` (0-based), optionally
  ``QEVO_LOCAL_DEVICES`` (comma-separated local device ids);
* by JAX's cluster detection (SLURM, Cloud TPU, Open MPI, ...) when ``QEVO_DISTRIBUTED=1``
  and the explicit variables are unset.

A process that stops (killed, lost host) ends the others: their next collective fails, or
the coordination service misses its heartbeats for ``QEVO_HEARTBEAT_SECONDS`` (default 100),
and :func:`qevo.cli.main` ends each with one line (:func:`lost_peer`).  Rerunning every
process resumes from the work folder.

On CPU the processes talk through JAX's gloo collectives (``jax_cpu_collectives_implementation``),
which also serves tests: two local processes over the loopback address.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import jax

from qevo import files
from qevo.errors import ConfigError

COORDINATOR_ENV = "QEVO_COORDINATOR"
NUM_PROCESSES_ENV = "QEVO_NUM_PROCESSES"
PROCESS_ID_ENV = "QEVO_PROCESS_ID"
LOCAL_DEVICES_ENV = "QEVO_LOCAL_DEVICES"
AUTO_ENV = "QEVO_DISTRIBUTED"
HEARTBEAT_ENV = "QEVO_HEARTBEAT_SECONDS"

# What the runtime says when another process of the run has died: a collective that lost its
# peer (gloo on CPU) or the coordination service that stopped hearing from it.
_LOST_PEER = ("Connection reset by peer", "Connection closed by peer", "heartbeat timeout", "Gloo")
_joined = False


def requested(environ=os.environ) -> bool:
    """Whether the environment asks this process to join a multi-process run."""
    return bool(environ.get(COORDINATOR_ENV) or environ.get(AUTO_ENV) == "1")


def _int(environ, name: str) -> int:
    value = environ.get(name)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"${name}={value!r} must be an integer in a multi-process run") from None


def initialize(environ=os.environ) -> bool:
    """Join the multi-process run the environment describes (module docstring); returns
    whether it did.  Call it before any JAX computation; a no-op when nothing is requested.
    Every process but process 0 then discards its file writes (:func:`qevo.files.discard_writes`):
    process 0 writes the work folder, and every process reads it to resume.

    Raises:
      ConfigError: explicit variables missing or out of range.
    """
    if not requested(environ):
        return False
    heartbeat = _int(environ, HEARTBEAT_ENV) if environ.get(HEARTBEAT_ENV) else 100
    if heartbeat < 1:
        raise ConfigError(f"${HEARTBEAT_ENV}={heartbeat} must be >= 1 (seconds)")
    explicit = {}
    if environ.get(COORDINATOR_ENV):
        count, index = _int(environ, NUM_PROCESSES_ENV), _int(environ, PROCESS_ID_ENV)
        if count < 1 or not 0 <= index < count:
            raise ConfigError(f"${PROCESS_ID_ENV}={index} and ${NUM_PROCESSES_ENV}={count}: "
                              f"the id must be in 0..{NUM_PROCESSES_ENV}-1")
        local = environ.get(LOCAL_DEVICES_ENV)
        explicit = {"coordinator_address": environ[COORDINATOR_ENV], "num_processes": count, "process_id": index,
                    "local_device_ids": [int(d) for d in local.split(",")] if local else None}
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat, **explicit)
    global _joined
    _joined = True
    if not is_writer():
        files.discard_writes()
    return True


def lost_peer(err: BaseException) -> bool:
    """Whether ``err``, raised in a joined process, says that another process of the run died."""
    return _joined and any(marker in str(err) for marker in _LOST_PEER)


def sync(name: str) -> None:
    """Wait until every process of the joined run reaches the point ``name`` (nothing in one
    process): before a process reads a file that process 0 has just written."""
    if _joined:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def is_writer() -> bool:
    """Whether this process writes the run's files: process 0 (and a single process)."""
    return jax.process_index() == 0


def start_local(argv: list[str], processes: int, devices: int = 1, env: dict | None = None,
                cwd=None) -> list[subprocess.Popen]:
    """Start ``python <argv>`` as ``processes`` cooperating CPU processes on this machine,
    joined over the loopback address (a free port) when there are several, each with
    ``devices`` forced host devices: how a run of several hosts is tried on one.

    ``env`` is added to this process's environment; stdout and stderr are piped (text).
    Returns the processes in id order (process 0 writes the run's files).
    """
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", ""))
    base = {**os.environ, **(env or {}), "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices}".strip()}
    ids = [{}]
    if processes > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        base.update({COORDINATOR_ENV: f"127.0.0.1:{port}", NUM_PROCESSES_ENV: str(processes)})
        ids = [{PROCESS_ID_ENV: str(i)} for i in range(processes)]
    return [subprocess.Popen([sys.executable, *argv], env={**base, **i}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=cwd) for i in ids]
