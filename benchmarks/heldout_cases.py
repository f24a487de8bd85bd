"""The gate's held-out cursors for the replay benchmarks (bench_filter, bench_quant): one loader, one print."""

from __future__ import annotations

import os


def held_out_cases(params_path: str, max_files: int | None, model_dir: str):
    """params (with ``rlhf.gate.max_files`` set when given), the gate's cursors, and the two halves the benchmarks
    interleave so that both variants see the same machine load; prints the machine line every benchmark records."""
    from rlhf.config import load_rlhf_params
    from rlhf.heldout import gate_cursors, gate_docs

    params = load_rlhf_params(params_path)
    if max_files:
        params = params.model_copy(update={"rlhf": params.rlhf.model_copy(update={
            "gate": params.rlhf.gate.model_copy(update={"max_files": max_files})})})
    cases = gate_cursors(gate_docs(params), params)
    halves = (cases[: len(cases) // 2], cases[len(cases) // 2:])
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start; {len(cases)} held-out "
          f"cursors in {len({c.doc_id for c in cases})} files; {model_dir}", flush=True)
    return params, cases, halves
