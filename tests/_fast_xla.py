"""XLA flags of every process the tests start: cheaper XLA:CPU compiles.

Most of a cold test run is XLA:CPU compiling the same small programs; LLVM's expensive passes buy
nothing at these sizes (tests/test_gguf.py + test_steps.py + test_sampling.py from a cold cache:
291 s -> 228 s). Test-only: the library and its CLI never set them, and tests/_cli.py's runs (compared with the
method pins) do not get them.
"""

FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
