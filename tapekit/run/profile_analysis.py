"""What a profiler trace says, read with xprof (the optional extra `tapekit[profile]`): the
step time, the share of it spent waiting for input, TensorBoard's verdict on the bottleneck
and the ops that took the most time. The same numbers as TensorBoard's Profile tab (its
overview, input-pipeline and framework-op pages), without TensorBoard. Imports no
TensorFlow; xprof only when called.
"""

import json
import re
from typing import Dict, List, Sequence

INSTALL_HINT = ("`pip install 'tapekit[profile]'` (xprof) adds its analysis: step time, input "
                "wait, top ops")
TOP_OPS = 5


class XprofMissing(ImportError):
    """xprof is not installed: there is a trace, but no analysis of it."""


def analyse(xplane_paths: Sequence[str], top: int = TOP_OPS) -> Dict[str, object]:
    """The analysis of one capture (its `*.xplane.pb` files, one per host):

    - `step_time_ms`: the mean time of the marked steps (0.0 when none was measured);
    - `input_wait_percent`: the share of it spent waiting for input, as TensorBoard counts;
    - `verdict`: TensorBoard's words for it: "HIGHLY input-bound" (input wait 20% or more),
      "MODERATELY input-bound" (5% or more), "POTENTIALLY input-bound" (less, but 5% or more
      of the step in neither compute nor input: Python, I/O), "NOT input-bound", or
      "unknown" (no step measured);
    - `input_bound`: True for HIGHLY and MODERATELY;
    - `statement`: TensorBoard's sentence behind the verdict;
    - `top_ops`: the `top` op types by self time, summed over all ops of the type, as
      [{"op": type, "percent": share of all ops' self time}, ...];
    - `steps_measured`: how many steps the numbers are over.

    Raises XprofMissing without xprof, ValueError when xprof cannot convert the trace.
    """
    if not xplane_paths:
        raise ValueError("the capture has no .xplane.pb file")
    overview = _tool(xplane_paths, "overview_page")
    steps = _step_rows(overview[1])
    total = sum(step["stepTimeMs"] for step in steps)
    statement = overview[1].get("p", {}).get("input_conclusion", "")
    verdict = re.search(r"\b(HIGHLY|MODERATELY|POTENTIALLY|NOT) input-bound", statement)
    verdict = verdict.group(0) if verdict and steps else "unknown"
    return {
        "step_time_ms": round(total / len(steps), 4) if steps else 0.0,
        "input_wait_percent": round(100.0 * sum(step["infeedTimeMs"] for step in steps) / total, 2)
        if total else 0.0,
        "verdict": verdict,
        "input_bound": verdict.split()[0] in ("HIGHLY", "MODERATELY"),
        "statement": statement,
        "top_ops": top_ops(_tool(xplane_paths, "framework_op_stats"), top),
        "steps_measured": len(steps),
    }


def describe(first: int, last: int, analysis: Dict[str, object]) -> str:
    """The log line: 'profile of steps 21-40: step time 1.1 ms, 3% waiting for input (NOT
    input-bound), top ops: MatMul 20%, ...'."""
    ops = ", ".join(f"{op['op']} {op['percent']:.0f}%" for op in analysis["top_ops"]
                    if op["percent"] >= 0.5) or "none"
    if not analysis["steps_measured"]:
        return (f"profile of steps {first}-{last}: no step time measured ({analysis['statement']}), "
                f"top ops: {ops}")
    return (f"profile of steps {first}-{last}: step time {analysis['step_time_ms']:.3g} ms, "
            f"{analysis['input_wait_percent']:.0f}% waiting for input (TensorBoard: {analysis['verdict']}), "
            f"top ops: {ops}")


def top_ops(tables, top: int = TOP_OPS) -> List[Dict[str, object]]:
    """The `top` op types by self time in xprof's framework_op_stats `tables` (TensorFlow's
    names: `_MklMatMul`; `Dataset` for tf.data's work), as shares of all ops' self time (host
    idle time left out)."""
    table = tables[0]
    columns = [column["id"] for column in table.get("cols", [])]
    times: Dict[str, float] = {}
    for row in table.get("rows", []):
        values = dict(zip(columns, (cell.get("v") for cell in row["c"])))
        name = str(values.get("type"))
        if name == "IDLE":
            continue
        times[name] = times.get(name, 0.0) + float(values.get("total_self_time") or 0.0)
    total = sum(times.values())
    ranked = sorted(times.items(), key=lambda item: -item[1])[:top]
    return [{"op": name, "percent": round(100.0 * time / total, 2)} for name, time in ranked
            if total]


def _step_rows(table) -> List[Dict[str, float]]:
    columns = [column["id"] for column in table.get("cols", [])]
    rows = [dict(zip(columns, (cell.get("v") for cell in row["c"]))) for row in table.get("rows", [])]
    return [{key: float(row.get(key) or 0.0) for key in ("stepTimeMs", "infeedTimeMs")}
            for row in rows if row.get("stepTimeMs") is not None]


def _tool(xplane_paths: Sequence[str], tool: str):
    try:
        from xprof.convert import raw_to_tool_data
    except ImportError as error:
        raise XprofMissing(f"xprof is not installed ({error}); {INSTALL_HINT}") from None
    # Not use_saved_result: xprof would keep its own conversion beside the trace.
    data, _ = raw_to_tool_data.xspace_to_tool_data(list(xplane_paths), tool,
                                                   {"use_saved_result": False})
    if not data:
        raise ValueError(f"xprof could not convert the trace for {tool}")
    return json.loads(data)
