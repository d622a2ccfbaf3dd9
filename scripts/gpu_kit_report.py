#!/usr/bin/env python3
"""Step d of scripts/gpu-kit.sh: report.md and results.json from one run.

    python3 scripts/gpu_kit_report.py WORKDIR OUTDIR

WORKDIR holds what the steps wrote (steps.jsonl, env.json, NAME.out/.err,
timing.jsonl); the targets are the issue's (docs/gpu.md). A target whose
measurement is missing reads "not measured" with the step's status: nothing
is filled in that did not run.
"""

import json
import os
import re
import sys


def read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def json_lines(text):
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass
    return rows


def main():
    work, out = sys.argv[1], sys.argv[2]
    steps = json_lines(read(os.path.join(work, "steps.jsonl")))
    status = {s["step"]: s for s in steps}
    try:
        env = json.loads(read(os.path.join(work, "env.json")) or "{}")
    except ValueError:
        env = {}

    def step_text(name):
        return read(os.path.join(work, name + ".out")) + read(os.path.join(work, name + ".err"))

    def why(name):
        s = status.get(name)
        if not s:
            return "step %s did not run" % name
        return "step %s: %s%s" % (name, s["status"], (" (" + s["reason"] + ")") if s.get("reason") else "")

    # a. tests and gpu_check
    tests = {}
    for name in ("a1-cuda_gpu", "a2-cache_decode", "a3-decode_kernels"):
        m = re.findall(r"test result: (\w+)\. (\d+) passed; (\d+) failed", step_text(name))
        tests[name] = {"status": status.get(name, {}).get("status", "not run"),
                       "passed": sum(int(x[1]) for x in m), "failed": sum(int(x[2]) for x in m),
                       "skip_lines": len(re.findall(r"SKIP", step_text(name)))}
    checks = [r for r in json_lines(read(os.path.join(work, "a4-gpu_check.out"))) if "check" in r]
    failed_checks = [c for c in checks if not c.get("ok")]

    # b. sanitizers
    san = {}
    for name, pat in (("b1-memcheck", r"ERROR SUMMARY: (\d+) error"),
                      ("b2-racecheck", r"RACECHECK SUMMARY: (\d+) hazard")):
        text = step_text(name)
        m = re.findall(pat, text)
        # A sanitizer that cannot attach to the device (seen under gVisor)
        # found nothing about the kernels: no count, and the reason.
        refused = re.search(r"Device not supported|not supported on this device", text)
        san[name] = {"status": status.get(name, {}).get("status", "not run"),
                     "findings": sum(int(x) for x in m) if m and not refused else None,
                     "note": refused.group(0) if refused else ""}

    # c. timing
    timing = [r for r in json_lines(read(os.path.join(work, "timing.jsonl")))]
    decode = [r for r in json_lines(read(os.path.join(work, "c2-decode.out"))) if "what" in r and "ms" in r]

    def row(impl, n):
        return next((r for r in timing if r.get("impl") == impl and r.get("n") == n and "ms" in r), None)

    targets = []

    def target(name, want, value, met, missing):
        targets.append({"target": name, "want": want, "value": value,
                        "status": ("met" if met else "not met") if value is not None else "not measured: " + missing})

    full, sdpa = row("full-causal-crate", 32768), row("sdpa-full-causal", 32768)
    v = full["tflops"] / sdpa["tflops"] if full and sdpa else None
    target("full causal TFLOP/s over SDPA (flash) at 32K", ">= 0.90", v and round(v, 3), v is not None and v >= 0.9, why("c1-timing"))
    ksa, sdpa, flex = row("ksa-crate", 131072), row("sdpa-full-causal", 131072), row("flex-ksa", 131072)
    v = sdpa["ms"] / ksa["ms"] if ksa and sdpa else None
    target("KSA speedup over SDPA (flash) full causal at 128K", ">= 5x", v and round(v, 2), v is not None and v >= 5, why("c1-timing"))
    v = flex["ms"] / ksa["ms"] if ksa and flex else None
    target("KSA speedup over FlexAttention (KSA mask) at 128K", "> 1x", v and round(v, 2), v is not None and v > 1, why("c1-timing"))
    ratios = [(r["impl"], r["n"], r["bwd_over_fwd"]) for r in timing
              if r.get("impl") in ("ksa-crate", "full-causal-crate") and "bwd_over_fwd" in r]
    v = max(x[2] for x in ratios) if ratios else None
    target("crate backward time over forward (worst of KSA/full causal, all n)", "<= 3", v and round(v, 2), v is not None and v <= 3, why("c1-timing"))
    ksa_dec = [r for r in decode if r.get("what") == "ksa"]
    v = min(r["of_copy"] for r in ksa_dec) if ksa_dec else None
    target("KSA decode read bandwidth over copy bandwidth (worst of 32K/128K, batch 1/8)", ">= 0.60", v and round(v, 3), v is not None and v >= 0.6, why("c2-decode"))
    counts = [s["findings"] for s in san.values()]
    v = sum(counts) if counts and all(c is not None for c in counts) else None
    target("compute-sanitizer findings (memcheck errors + racecheck hazards)", "0", v, v == 0, why("b1-memcheck") + "; " + why("b2-racecheck"))
    checks_total = len(checks)
    ok_checks = checks_total - len(failed_checks)
    target("gpu_check correctness checks passed", "all", "%d/%d" % (ok_checks, checks_total) if checks_total else None,
           checks_total > 0 and not failed_checks, why("a4-gpu_check"))

    # A GPU ran the kit when nvidia-smi named one and some GPU step was not skipped.
    has_gpu = bool(env.get("gpu")) and not str(env.get("gpu")).startswith("nvidia-smi not found")
    ran_on_gpu = has_gpu and any(s["status"] != "skip" for s in steps if s["step"][0] in "abc")
    results = {"ran_on_gpu": ran_on_gpu, "env": env, "steps": steps, "tests": tests, "checks": checks,
               "sanitizer": san, "timing": timing, "decode": decode, "targets": targets}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)

    md = ["# GPU kit report", ""]
    kit = env.get("kit", {})
    md.append("Kit: commit `%s`%s, packed %s. GPU: %s. Driver CUDA: %s. CPU: %s." % (
        kit.get("commit", "?")[:12], " (dirty)" if kit.get("dirty") else "", kit.get("packed_utc", "?"),
        env.get("gpu", "?"), env.get("driver_cuda_version"), env.get("cpu", "?")))
    md.append("")
    if not ran_on_gpu:
        md += ["**No GPU ran this**: every GPU step was skipped (reasons below).", ""]
    md += ["## Targets", "", "| target | wanted | measured | status |", "|---|---|---|---|"]
    for t in targets:
        md.append("| %s | %s | %s | %s |" % (t["target"], t["want"], "-" if t["value"] is None else t["value"], t["status"].replace("|", "/")))
    md += ["", "## Steps", "", "| step | budget s | seconds | status | reason |", "|---|---|---|---|---|"]
    for s in steps:
        md.append("| %s | %d | %.1f | %s | %s |" % (s["step"], s["budget_s"], s["seconds"], s["status"], s.get("reason", "").replace("|", "/")[:200]))
    md += ["", "## Correctness (a)", "", "| tests | status | passed | failed |", "|---|---|---|---|"]
    for name, t in tests.items():
        md.append("| %s | %s | %d | %d |" % (name, t["status"], t["passed"], t["failed"]))
    if checks:
        md += ["", "| check | case | error | tolerance | ok |", "|---|---|---|---|---|"]
        for c in checks:
            case = c.get("case")
            case = ", ".join("%s=%s" % kv for kv in case.items()) if isinstance(case, dict) else str(case)
            err = c.get("err", c.get("got", ""))
            md.append("| %s | %s | %s | %s | %s |" % (c["check"], case, ("%.3g" % err) if isinstance(err, float) else str(err)[:80],
                                                     c.get("tol", "-"), "yes" if c.get("ok") else "**NO**"))
    md += ["", "## Sanitizers (b)", ""]
    for name, s in san.items():
        md.append("* %s: %s, findings: %s%s" % (name, s["status"], "-" if s["findings"] is None else s["findings"],
                                               " (%s)" % s["note"] if s["note"] else ""))
    md += ["", "## Prefill timing (c): bf16, 32 query / 8 KV heads, d = 128, batch 1, C=8 S=1 W=128", "",
           "| n | impl | ms (median) | useful TFLOP/s | backward ms | backward / forward | note |", "|---|---|---|---|---|---|---|"]
    for r in timing:
        if "ms" not in r:
            md.append("| %s | %s | - | - | - | - | skipped: %s |" % (r.get("n"), r.get("impl"), str(r.get("skipped", "")).replace("|", "/")[:160]))
            continue
        sd = row("sdpa-full-causal", r["n"])
        note = "%.2fx faster than SDPA" % (sd["ms"] / r["ms"]) if sd and r["impl"] == "ksa-crate" else r.get("backend", "")
        note = (note + "; " + r["note"]) if r.get("note") else note
        md.append("| %d | %s | %.3f | %.1f | %s | %s | %s |" % (r["n"], r["impl"], r["ms"], r["tflops"],
                  "%.3f" % r["bwd_ms"] if "bwd_ms" in r else "-", "%.2f" % r["bwd_over_fwd"] if "bwd_over_fwd" in r else "-", note))
    md += ["", "## Decode (c): one layer, 32 query / 8 KV heads of 128, bf16", "",
           "| what | n | batch | keys per KV head | ms per step | GB/s | of copy |", "|---|---|---|---|---|---|---|"]
    for r in decode:
        md.append("| %s | %s | %s | %s | %.4f | %.0f | %s |" % (r["what"], r.get("n", "-"), r.get("batch", "-"), r.get("keys_per_kv_head", "-"),
                  r["ms"], r["gb_s"], "%.2f" % r["of_copy"] if "of_copy" in r else "-"))
    md += ["", "## Environment", "", "```", json.dumps({k: v for k, v in env.items() if k != "kit"}, indent=1), "```", ""]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(md))
    print("report: %s/report.md, %s/results.json (GPU ran: %s)" % (out, out, "yes" if ran_on_gpu else "no"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
