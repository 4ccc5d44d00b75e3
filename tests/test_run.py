"""The command harness: a program that runs out of device memory ends the command with one line."""

import pathlib

import jax
import jax.numpy as jnp
import pytest

from qevo import run
from qevo.population import PopulationMemoryError

CONFIG = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "lenet5.py")


def _exhaust_memory(cfg, workdir):
    """A real XLA allocation failure: 2^48 bytes, beyond any address space."""
    return jax.jit(lambda x: jnp.broadcast_to(x, (2**28, 2**20)) + 1)(jnp.ones((), jnp.int8)).block_until_ready()


def _population_too_big(cfg, workdir):
    raise PopulationMemoryError("scoring 16 individuals does not fit")


@pytest.mark.parametrize("fn, start", [
    (_exhaust_memory, "qevo.search: error: out of device memory (RESOURCE_EXHAUSTED: Out of memory allocating 281474976710656 bytes.); "
                      "lower the population or batch sizes"),
    (_population_too_big, "qevo.search: error: scoring 16 individuals does not fit; "),
])
def test_out_of_memory_ends_the_command_with_its_memory_settings(fn, start, tmp_path, capsys):
    argv = ["--config", CONFIG, "--workdir", str(tmp_path), "--config.population_size=24", "--config.search.strategy=vmap"]
    assert run.main("qevo.search", fn, lambda cfg: cfg, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(start), err
    assert ("memory settings now: --config.population_size=24 --config.search.strategy=vmap --config.search.chunk_size=None "
            "--config.search.qat_batch_size=") in err
    assert "float_from" not in err


def test_out_of_memory_after_float_training_says_how_to_reuse_the_float_model(tmp_path, capsys):
    (tmp_path / "float").mkdir()
    (tmp_path / "float" / "model.msgpack").write_bytes(b"")
    assert run.main("qevo.search", _exhaust_memory, lambda cfg: cfg, ["--config", CONFIG, "--workdir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.endswith(f"; with a new --workdir, --config.float_from={tmp_path / 'float'} reuses this run's float model\n")


def test_other_runtime_errors_are_not_called_memory(tmp_path):
    def fails(cfg, workdir):
        raise jax.errors.JaxRuntimeError("INTERNAL: something else")

    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
        run.main("qevo.search", fails, lambda cfg: cfg, ["--config", CONFIG, "--workdir", str(tmp_path)])
