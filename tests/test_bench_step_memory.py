"""bench/step_memory.py's collective byte count: result shapes times how often their computation runs."""

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("step_memory", REPO / "bench" / "step_memory.py")
script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(script)

# A module in the compiled-HLO text layout: an all-gather in a 30-trip loop body, an all-reduce in
# the entry computation, and an async all-gather pair whose -done result alone is counted.
HLO = """HloModule jit_step

%body (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %ag = f32[8,8]{1,0} all-gather(f32[4,8]{1,0} %x), dimensions={0}
  ROOT %t = (s32[], f32[4,8]) tuple(%i, %x)
}

%cond (p: (s32[], f32[4,8])) -> pred[] {
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%add (a: f32[], b: f32[]) -> f32[] {
  ROOT %s = f32[] add(%a, %b)
}

ENTRY %main (a: f32[4,8]) -> f32[16] {
  %w = (s32[], f32[4,8]) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"30"}}
  %ar = f32[16]{0} all-reduce(f32[16]{0} %y), to_apply=%add
  %ags = (bf16[2,4]{1,0}, bf16[4,4]{1,0}) all-gather-start(bf16[2,4]{1,0} %z), dimensions={0}
  %agd = bf16[4,4]{1,0} all-gather-done(%ags)
  ROOT %r = f32[16]{0} copy(%ar)
}
"""


def test_loop_bodies_count_once_per_trip():
    runs = script._executions(script._computations(HLO))
    assert runs["body"] == 30 and runs["cond"] == 30 and runs["ENTRY"] == 1 and runs["add"] == 1
    got = script.collective_bytes(HLO)
    assert got["all-gather"] == 30 * 8 * 8 * 4 + 4 * 4 * 2  # the loop's f32[8,8] x 30, the async bf16[4,4] once
    assert got["all-reduce"] == 16 * 4 and got["all-to-all"] == 0
    assert script.collectives(HLO).startswith("all-gather 0.0 MB, all-reduce 0.0 MB")
    assert script._nbytes("bf16", "4,4") == 32 and script._nbytes("pred", "") == 1
