"""Test set-up: 8 fake CPU devices so sharded code is exercised on one machine (STYLE.md)."""
import os

from tests._fast_xla import FAST_XLA  # noqa: E402

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8 " + FAST_XLA
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Compiled XLA programs are shared between the test processes (the CLI tests start several runs of
# the same programs): a persistent cache turns their repeated compiles into disk reads.
import tempfile  # noqa: E402

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "cream_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import signal  # noqa: E402

# A suite started in the background by a non-interactive shell inherits SIGINT ignored, and so would
# every process it starts: the Ctrl-C tests need Python's own handler (a child gets SIG_DFL at exec).
signal.signal(signal.SIGINT, signal.default_int_handler)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """One uninterrupted CLI run of tests/configs/smoke.gin (CREAM, 2 iterations), shared by the
    end-to-end modules: (workdir, completed process)."""
    from tests._cli import cli  # noqa: PLC0415

    workdir = tmp_path_factory.mktemp("smoke") / "run"
    return workdir, cli(workdir)
