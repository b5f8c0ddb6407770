"""The summary table that ends ``make gpu-check``: each step's result and time, and each bench
section's headline ratio, read from ``bench.json``.

``python -m steerlm_kernels.bench.summary OUT/bench.json --steps OUT/steps.tsv`` prints::

    step                          result  seconds
    install                       passed       48
    tests (CUDA)                  FAILED      131   (see tests.log)
    ...
    section  shape                        headline                                   check
    ce       train N=16384 V=128256 bf16  triton (auto) 3.10x eager | cuda 2.95x ...   agrees
    ...

``steps.tsv`` holds one line per step, ``name<TAB>exit status<TAB>seconds[<TAB>note]`` (written by
``benchmarks/gpu_check.sh``). ``bench.json`` may also be a ``bench.partial.json`` (a list of rows,
left by a bench killed by its time limit): the sections' first shapes then stand in for the main
ones. Headlines (at the main shape):

* ``ce``: the train phase (weighted loss forward + backward), each of our backends' speed-up over
  eager PyTorch (time of eager / ours), the auto backend first;
* ``linear``: the train phase of the fused linear loss, our time over the bare matmuls' (the floor,
  lower is better) and the speed-up over eager;
* ``group``: ``steerlm2_weights``, our speed-up over eager;
* ``dist``: megatron-core's time / ours at the largest tensor-parallel size, collectives per call;
* ``peers``: how many of the peers' checks agree with our values;
* ``score``: our scoring's tokens/s over the plain Hugging Face loop's, and its peak extra memory
  as a fraction of the loop's;
* ``train`` (one SteerLM 2.0 step): at each micro-batch size (``mbs 1/2/4/8``), ours fused's tokens/s
  over NeMo-style eager's (the speed-up, higher is better) and its peak extra memory over eager's
  (lower is better), then the largest fused micro-batch whose peak fits in eager's smallest
  micro-batch's (SPEC's GPU target: >= 4x the micro-batch in the same memory);
* ``dropin``, two lines: the Hugging Face Trainer step (``trainer``) and the loss alone (``op``): our
  tokens/s over the baseline's (``HF unpatched`` / ``eager``) and over the fastest peer's that ran
  (Liger, CCE, ``F.linear_cross_entropy``), our peak extra memory over the baseline's and over the
  least of the peers' (``memory``: peak extra memory, as in the section's table).

``check`` says ``agrees`` when every row of the section ran and agreed with its reference, else how
many rows failed or disagreed (``train`` / ``dropin``: loss, distance or gradient beyond the
section's tolerance, NaN included; a ``dropin`` row skipped as not available here is not counted).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Step:
    """One step of the check: its name, exit status, seconds and an optional note."""

    name: str
    rc: int
    seconds: float
    note: str = ""

    @property
    def passed(self) -> bool:
        return self.rc == 0


@dataclass
class Headline:
    """One section's line of the summary."""

    section: str
    shape: str
    headline: str
    check: str


def read_steps(path: Path) -> list[Step]:
    """Parse ``steps.tsv`` (``name<TAB>rc<TAB>seconds[<TAB>note]`` per line; other lines ignored)."""
    steps = []
    for line in path.read_text().splitlines():
        parts = line.rstrip("\n").split("\t")
        if len(parts) < 3:
            continue
        try:
            steps.append(Step(parts[0], int(parts[1]), float(parts[2]), parts[3] if len(parts) > 3 else ""))
        except ValueError:
            continue
    return steps


def load_bench(path: Path) -> dict[str, Any]:
    """``bench.json`` as a dict; a ``bench.partial.json`` (a list of rows) becomes ``{"rows": ...}``."""
    data = json.loads(path.read_text())
    return {"rows": data, "meta": {}, "partial": True} if isinstance(data, list) else data


def _x(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}x"


def _check(rows: list[dict[str, Any]]) -> str:
    bad = [r for r in rows if r.get("error") or r.get("agrees") is False]
    if not rows:
        return "not run"
    return "agrees" if not bad else f"{len(bad)} of {len(rows)} rows FAILED/MISMATCH"


def _main_rows(rows: list[dict[str, Any]], section: str, shape: tuple[int, ...] | None) -> list[dict[str, Any]]:
    """The section's rows at ``shape`` ((n, v) or (n, v, h)); the first row's shape when None."""
    sec = [r for r in rows if r.get("section", "ce") == section]
    if not sec:
        return []
    if shape is None:
        shape = (sec[0]["n"], sec[0]["v"], sec[0].get("h", 0))[: 3 if section == "linear" else 2]
    key = ("n", "v", "h")[: len(shape)]
    return [r for r in sec if tuple(r.get(k, 0) for k in key) == tuple(shape)]


def _ours_first(rows: list[dict[str, Any]], auto: str | None) -> list[dict[str, Any]]:
    ours = [r for r in rows if r.get("ours")]
    return sorted(ours, key=lambda r: r["impl"] != auto)


def _label(r: dict[str, Any], auto: str | None) -> str:
    return r["impl"] + (" (auto)" if r["impl"] == auto else "")


def ce_headline(bench: dict[str, Any]) -> Headline | None:
    meta = bench.get("meta") or {}
    shape = (meta["n"], meta["v"]) if "n" in meta and "v" in meta else None
    rows = _main_rows(bench.get("rows") or [], "ce", shape)
    if not rows:
        return None
    auto = meta.get("auto_backend")
    train = [r for r in rows if r["phase"] == "train"] or rows
    parts = [f"{_label(r, auto)} {_x(r.get('vs_eager'))}" for r in _ours_first(train, auto)]
    r0 = train[0]
    return Headline("ce", f"{r0['phase']} N={r0['n']} V={r0['v']} {r0.get('dtype', '')}".strip(),
                    (" | ".join(parts) or "no row of ours") + " vs eager", _check(rows))


def linear_headline(bench: dict[str, Any]) -> Headline | None:
    meta = bench.get("meta") or {}
    main = meta.get("linear_main")
    rows = _main_rows(bench.get("rows") or [], "linear", tuple(main) if main else None)
    if not rows:
        return None
    auto = meta.get("auto_backend")
    train = [r for r in rows if r["phase"] == "train"] or rows
    parts = [f"{_label(r, auto)} {_x(r.get('vs_floor'))} the matmuls, {_x(r.get('vs_eager'))} eager"
             for r in _ours_first(train, auto)]
    r0 = train[0]
    return Headline("linear", f"{r0['phase']} N={r0['n']} V={r0['v']} H={r0['h']} {r0.get('dtype', '')}".strip(),
                    " | ".join(parts) or "no row of ours", _check(rows))


def group_headline(bench: dict[str, Any]) -> Headline | None:
    rows = [r for r in bench.get("rows") or [] if r.get("section") == "group"]
    if not rows:
        return None
    auto = (bench.get("meta") or {}).get("auto_backend")
    op = [r for r in rows if r["phase"] == "steerlm2_weights"] or rows
    parts = [f"{_label(r, auto)} {_x(r.get('vs_eager'))} eager" for r in _ours_first(op, auto)]
    return Headline("group", f"{op[0]['phase']} B={op[0]['n']}", " | ".join(parts) or "no row of ours",
                    _check(rows))


def dist_headline(bench: dict[str, Any]) -> Headline | None:
    dist = bench.get("dist")
    if not dist:
        return None
    if dist.get("error"):
        return Headline("dist", "", "", f"FAILED: {dist['error'][:80]}")
    rows = dist.get("rows") or []
    if not rows:
        return Headline("dist", "", "no rows", "not run")
    tp = max(r["tp"] for r in rows)
    by = {r["impl"]: r for r in rows if r["tp"] == tp}
    ours, meg = by.get("ours"), by.get("megatron")
    if ours is None:
        return Headline("dist", f"tp={tp}", "no row of ours", "FAILED")
    text = f"ours {len(ours.get('fwd_collectives') or [])} collectives"
    if meg is not None and ours.get("median_ms") and meg.get("median_ms"):
        text += (f", megatron {len(meg.get('fwd_collectives') or [])}; megatron's time / ours "
                 f"{_x(meg['median_ms'] / ours['median_ms'])}")
    errs = [r.get("loss_rel_err_vs_megatron") or 0.0 for r in rows]
    check = "agrees" if max(errs) <= 1e-5 else f"MISMATCH (rel err {max(errs):.1e})"
    return Headline("dist", f"tp={tp} N={ours.get('n')} V={ours.get('v')}", text, check)


def peers_headline(bench: dict[str, Any]) -> Headline | None:
    peers = bench.get("peers")
    if not peers:
        return None
    rows = peers.get("rows") or []
    good = sum(bool(r.get("agrees")) for r in rows)
    names = sorted({r.get("peer", "?") for r in rows})
    check = "agrees" if rows and good == len(rows) else ("not run" if not rows else f"{len(rows) - good} DISAGREE")
    return Headline("peers", peers.get("device", ""), f"{good}/{len(rows)} checks agree ({', '.join(names)})", check)


def score_headline(bench: dict[str, Any]) -> Headline | None:
    score = bench.get("score")
    if not score:
        return None
    if score.get("error"):
        return Headline("score", "", "", f"FAILED: {score['error'][:80]}")
    ours = next((r for r in score.get("rows") or [] if r.get("impl", "").startswith("ours")), None)
    if ours is None or "error" in ours:
        return Headline("score", "", "", f"FAILED: {(ours or {}).get('error', 'no row of ours')[:80]}")
    mem = ours.get("memory_ratio")
    text = f"ours {_x(ours.get('speedup'))} the plain HF loop's tokens/s, peak extra memory " + (
        "n/a" if mem is None else f"{mem:.2f} of its")
    shape = score.get("shape") or {}
    return Headline("score", f"V={shape.get('v')} H={shape.get('h')} {shape.get('dtype', '')}".strip(), text,
                    "agrees" if score.get("agrees") else "MISMATCH")


def _ratio(num: Any, den: Any) -> float | None:
    """``num / den`` for two positive finite numbers, else None."""
    ok = all(isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in (num, den))
    return num / den if ok and den > 0 and num >= 0 else None


def _ran(r: dict[str, Any]) -> bool:
    return not r.get("error") and not r.get("skipped") and r.get("tokens_per_s") is not None


def _section_check(result: dict[str, Any], rows: list[dict[str, Any]], diffs: tuple[str, ...]) -> str:
    """``agrees``, or how many of ``rows`` (skipped ones aside) failed or differ from their reference by more
    than the section's ``tolerance`` in one of ``diffs`` (a NaN difference counts)."""
    tol = result.get("tolerance")
    rows = [r for r in rows if not r.get("skipped")]
    bad = [r for r in rows if r.get("error") or (tol is not None and any(
        d in r and not (isinstance(r[d], int | float) and r[d] <= tol) for d in diffs))]
    if not rows:
        return "not run"
    if bad:
        return f"{len(bad)} of {len(rows)} rows FAILED/MISMATCH"
    return "MISMATCH" if tol is None and result.get("agrees") is False else "agrees"  # no tolerance: the flag


def train_headline(bench: dict[str, Any]) -> Headline | None:
    """``train``: per micro-batch size, ours fused's tokens/s over NeMo-style eager's (the speed-up) and its peak
    extra memory over eager's, then the largest fused micro-batch within eager's smallest micro-batch's memory."""
    train = bench.get("train")
    if not train:
        return None
    if train.get("error"):
        return Headline("train", "", "", f"FAILED: {str(train['error'])[:80]}")
    c = train.get("shape") or {}
    b = c["groups"] * c["responses"] if "groups" in c and "responses" in c else "?"
    shape = f"step B={b} S={c.get('s')} V={c.get('v')} H={c.get('h')} {c.get('dtype', '')}".strip()
    rows = train.get("rows") or []
    eager = {r["mbs"]: r for r in rows if r.get("impl") == "NeMo-style eager" and _ran(r)}
    fused = {r["mbs"]: r for r in rows if r.get("impl") == "ours fused" and _ran(r)}
    check = _section_check(train, rows, ("loss_rel_diff", "distance_rel_diff"))
    if not fused:
        return Headline("train", shape, "ours fused did not run", check)
    sizes = sorted(fused)
    speed = [_ratio(fused[m]["tokens_per_s"], (eager.get(m) or {}).get("tokens_per_s")) for m in sizes]
    mem = [_ratio(fused[m].get("extra_mib"), (eager.get(m) or {}).get("extra_mib")) for m in sizes]
    text = (f"ours fused / eager at mbs {'/'.join(map(str, sizes))}: {'/'.join(_x(s) for s in speed)} tokens/s, "
            f"{'/'.join(_x(m) for m in mem)} peak memory")
    if eager:
        m0 = min(eager)
        budget = eager[m0].get("extra_mib")
        fits = [m for m in sizes if _ratio(fused[m].get("extra_mib"), budget) is not None
                and fused[m]["extra_mib"] <= budget]
        text += (f"; fused mbs {max(fits)} in eager's mbs-{m0} memory" if fits
                 else f"; no fused micro-batch in eager's mbs-{m0} memory")
    return Headline("train", shape, text, check)


#: ``dropin``: our row and the baseline row of each part (every other row that ran is a peer).
DROPIN_OURS = {"trainer": "sk patch", "op": "ours"}
DROPIN_BASE = {"trainer": "HF unpatched", "op": "eager"}


def dropin_headline(bench: dict[str, Any], part: str = "trainer") -> Headline | None:
    """``dropin``, one ``part`` (``trainer``: the Hugging Face Trainer step; ``op``: the loss alone): our tokens/s
    over the baseline's (HF unpatched / eager) and over the fastest peer's, our peak extra memory over the
    baseline's and over the least of the peers' (the SPEC target: at most the best peer's memory, faster)."""
    dropin = bench.get("dropin")
    if not dropin:
        return None
    if dropin.get("error"):
        return Headline("dropin", "", "", f"FAILED: {str(dropin['error'])[:80]}") if part == "trainer" else None
    rows = [r for r in dropin.get("rows") or [] if r.get("part") == part]
    if not rows:
        return None
    c = dropin.get("shape") or {}
    shape = f"{part} B={c.get('b')} S={c.get('s')} V={c.get('v')} H={c.get('h')} {c.get('dtype', '')}".strip()
    check = _section_check(dropin, rows, ("loss_rel_diff", "grad_rel_diff"))
    ours = next((r for r in rows if r.get("impl") == DROPIN_OURS[part] and _ran(r)), None)
    if ours is None:
        return Headline("dropin", shape, f"ours ({DROPIN_OURS[part]}) did not run", check)
    base = next((r for r in rows if r.get("impl") == DROPIN_BASE[part] and _ran(r)), None)
    peers = [r for r in rows if r.get("impl") not in (DROPIN_OURS[part], DROPIN_BASE[part]) and _ran(r)]
    parts = []
    if base is not None:
        parts.append(f"{ours['impl']} vs {base['impl']}: {_x(_ratio(ours['tokens_per_s'], base['tokens_per_s']))} "
                     f"tokens/s, {_x(_ratio(ours.get('extra_mib'), base.get('extra_mib')))} memory")
    else:
        parts.append(f"{ours['impl']}: {DROPIN_BASE[part]} did not run")
    if peers:
        fast = max(peers, key=lambda r: r["tokens_per_s"])
        with_mem = [r for r in peers if _ratio(r.get("extra_mib"), 1.0) is not None and r["extra_mib"] > 0]
        least = min(with_mem, key=lambda r: r["extra_mib"]) if with_mem else None
        speed = _x(_ratio(ours["tokens_per_s"], fast["tokens_per_s"]))
        mem = _x(None if least is None else _ratio(ours.get("extra_mib"), least["extra_mib"]))
        if least is None or least is fast:
            parts.append(f"vs {fast['impl']} (best peer): {speed} tokens/s, {mem} memory")
        else:
            parts.append(f"vs {fast['impl']} (fastest peer): {speed} tokens/s; vs {least['impl']} (least-memory "
                         f"peer): {mem} memory")
    else:
        parts.append("no peer ran")
    return Headline("dropin", shape, "; ".join(parts), check)


def dropin_op_headline(bench: dict[str, Any]) -> Headline | None:
    """``dropin``'s ``op`` part (the loss alone): :func:`dropin_headline` with ``part="op"``."""
    return dropin_headline(bench, "op")


HEADLINES = (ce_headline, linear_headline, group_headline, dist_headline, peers_headline, score_headline,
             train_headline, dropin_headline, dropin_op_headline)


def headlines(bench: dict[str, Any]) -> list[Headline]:
    """Every section's headline found in ``bench`` (sections listed in its meta but without rows
    say ``not run``)."""
    out = [h for fn in HEADLINES if (h := fn(bench)) is not None]
    seen = {h.section for h in out}
    for section in (bench.get("meta") or {}).get("sections") or []:
        if section not in seen:
            out.append(Headline(section, "", "no rows (out of time, or failed before its first row)", "not run"))
    return out


def _table(head: Sequence[str], rows: list[Sequence[str]]) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*head).rstrip(), *(fmt.format(*map(str, r)).rstrip() for r in rows)]


def render(steps: list[Step], bench: dict[str, Any] | None, bench_note: str = "") -> str:
    """The summary: the steps' table, then the sections' table (or why there is none)."""
    lines = ["", "=" * 30 + " summary " + "=" * 30]
    if steps:
        lines += _table(("step", "result", "seconds", "note"),
                        [(s.name, "passed" if s.passed else f"FAILED (rc={s.rc})", f"{s.seconds:.0f}", s.note)
                         for s in steps])
        lines.append("")
    if bench is None:
        lines.append(f"bench: no results ({bench_note or 'bench.json not found'})")
    else:
        if bench.get("partial"):
            lines.append("bench: PARTIAL results (bench.partial.json: the run was cut short)")
        hl = headlines(bench)
        lines += _table(("section", "shape", "headline", "check"),
                        [(h.section, h.shape, h.headline, h.check) for h in hl]) if hl else ["bench: no rows"]
    if steps:
        failed = [s.name for s in steps if not s.passed]
        lines += ["", f"overall: {'FAILED: ' + ', '.join(failed) if failed else 'every step passed'}"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the summary; exit status 0 (the check's own status is the steps')."""
    p = argparse.ArgumentParser(prog="python -m steerlm_kernels.bench.summary", description=__doc__.splitlines()[0])
    p.add_argument("bench_json", type=Path, help="bench.json (or bench.partial.json) of a bench run")
    p.add_argument("--steps", type=Path, default=None, help="steps.tsv: name<TAB>rc<TAB>seconds[<TAB>note] per line")
    ns = p.parse_args(argv)
    steps = read_steps(ns.steps) if ns.steps is not None and ns.steps.is_file() else []
    bench, note = None, ""
    path = ns.bench_json
    if not path.is_file() and path.with_name("bench.partial.json").is_file():
        path = path.with_name("bench.partial.json")
    try:
        bench = load_bench(path)
    except (OSError, ValueError) as exc:
        note = f"{path}: {type(exc).__name__}: {exc}"
    print(render(steps, bench, note))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
