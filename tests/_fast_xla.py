"""XLA flags for cheaper XLA:CPU compiles: the in-process tests (conftest), the notebook kernel and
the multi-host workers.

Most of a cold test run is XLA:CPU compiling small programs, and LLVM's expensive passes buy
nothing at these sizes (tests/test_gguf.py + test_steps.py + test_sampling.py from a cold cache:
291 s -> 228 s). Test-only: the library and its CLI never set them. tests/_cli.py's runs, which are
compared with the method pins, and the Ctrl-C run keep XLA's default flags.
"""

FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
