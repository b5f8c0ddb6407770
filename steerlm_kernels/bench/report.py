"""``steerlm-kernels bench``'s output: the markdown tables of every section and the PNG plots.

:func:`render` gives the header and one table per section, ready to paste into
``benchmarks/RESULTS.md``; :func:`write_plots` draws time and peak extra memory against V and N.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from steerlm_kernels.bench import ce, dist, peers_check
from steerlm_kernels.bench.harness import Row, fmt, fmt_err, table_line, value_err_cell


def ce_tables(rows: list[Row], meta: dict[str, Any]) -> list[str]:
    ce_rows = [r for r in rows if r.section == "ce"]
    if not ce_rows:
        return []
    main = (meta["n"], meta["v"])
    bw = meta["bandwidth_gbps"].get(f"{main[0]}x{main[1]}", {})
    out = [
        f"### Logits in (`ce`): main shape N={main[0]}, V={main[1]}, {meta['dtype']}",
        "",
        f"{meta['n'] // meta['s']} sequences × {meta['s']} tokens, {meta.get('masked_fraction', 0):.0%} of tokens "
        f"masked; median of {meta['repeats']} runs. READ {bw.get('read', 0):.1f} GB/s (`torch.sum` of the logits), "
        f"COPY {bw.get('copy', 0):.1f} GB/s (`copy_`, read + write), measured in this run. Byte model: baseline "
        "reads the logits once, train reads twice and writes the gradient, in place reads and writes once.",
        "",
        ce.markdown_table([r for r in ce_rows if (r.n, r.v) == main]),
    ]
    grid = [r for r in ce_rows if (r.n, r.v) != main]
    if grid:
        shapes = list(dict.fromkeys((r.n, r.v) for r in ce_rows))
        out += ["", "Grid (median ms, × vs torch.compile, peak extra MiB); the main shape repeated for reference:", "",
                "| phase | implementation | " + " | ".join(f"N={n} V={v}" for n, v in shapes) + " |",
                "|---|---|" + "---|" * len(shapes)]
        by = {(r.phase, r.impl, r.n, r.v): r for r in ce_rows}
        for phase, impl, title in dict.fromkeys((r.phase, r.impl, r.title) for r in ce_rows):
            cells = []
            for n, v in shapes:
                r = by.get((phase, impl, n, v))
                if r is None:
                    cells.append("")
                elif r.error:
                    cells.append("ERROR")
                else:
                    flag = "" if r.agrees is not False else " MISMATCH"
                    cells.append(f"{fmt(r.median_ms, '.1f')} ({fmt(r.vs_compile, '.2f', '×')}, "
                                 f"{fmt(r.extra_mib, '.0f')} MiB){flag}")
            out.append(f"| {phase} | {title} | " + " | ".join(cells) + " |")
    return out


def linear_table(rows: list[Row], meta: dict[str, Any]) -> list[str]:
    lin = [r for r in rows if r.section == "linear"]
    if not lin:
        return []
    out = [f"### Hidden states in (`linear`): fused linear losses, {meta.get('linear_dtype')}", "",
           "FLOP model: 2·N·V·H per matmul; baseline needs 1 matmul, train 3 (logits, dL/dh, dL/dW). The matmul "
           "rate is the floor row's (bare matmuls in the input dtype into preallocated buffers) measured in this "
           "run; `vs floor` = time / the floor's time (SPEC target ≤ 1.2).", "",
           "| N | V | H | phase | implementation | median ms | TFLOP/s | % matmul rate | vs floor | vs eager "
           "| vs compile | vs F.lce | extra MiB | value rel err | grad rel err |",
           "|" + "---|" * 15]
    def cells(r: Row) -> list[str]:
        return [fmt(r.median_ms, ".1f"), fmt(r.tflops, ".3f"), fmt(r.frac_matmul, ".0%"), fmt(r.vs_floor, ".2f"),
                fmt(r.vs_eager, ".2f", "×"), fmt(r.vs_compile, ".2f", "×"), fmt(r.vs_lce, ".2f", "×"),
                fmt(r.extra_mib, ".1f"), value_err_cell(r), fmt_err(r.grad_rel_err)]

    return out + [table_line([str(r.n), str(r.v), str(r.h), r.phase, r.title], r, cells, 15) for r in lin]


def group_table(rows: list[Row], meta: dict[str, Any]) -> list[str]:
    grp = [r for r in rows if r.section == "group"]
    if not grp:
        return []
    out = ["### SteerLM 2.0 group ops (`group`)", "",
           f"B={grp[0].n} responses in groups of sizes 1..{grp[0].v} (unequal), float32. Byte model: "
           "`steerlm2_weights` 5 floats per response (3 read, 2 written), `segment_softmax` 2; COPY "
           f"{meta.get('group_copy_gbps', 0):.1f} GB/s on a buffer of the inputs' size (cache-resident: "
           "launch overhead, not bandwidth, decides these).", "",
           "| op | implementation | median ms | vs eager | vs compile | GB/s | % copy BW | extra MiB | rel err |",
           "|" + "---|" * 9]
    def cells(r: Row) -> list[str]:
        return [fmt(r.median_ms, ".3f"), fmt(r.vs_eager, ".2f", "×"), fmt(r.vs_compile, ".2f", "×"),
                fmt(r.gbps, ".2f"), fmt(r.frac_copy, ".1%"), fmt(r.extra_mib, ".1f"), value_err_cell(r)]

    return out + [table_line([r.phase, r.title], r, cells, 9) for r in grp]


def peers_table(peers_result: dict[str, Any] | None) -> list[str]:
    if peers_result is None:
        return []
    mode = peers_result.get("mode")
    how = ("on CPU tensors under the Triton interpreter (correctness only, never timed)" if mode == "interpreter"
           else "on the GPU")
    out = ["### Peers: agreement with our values", "", f"Liger-Kernel and Cut Cross-Entropy {how}.", ""]
    if peers_result.get("error"):
        return out + [f"**ERROR** {peers_result['error']}"]
    rows = peers_result.get("rows") or []
    for name, why in (peers_result.get("available") or {}).items():
        if why:
            out.append(f"- `{name}` not checked: {why}")
    if not rows:
        return out + ["No peer installed (`pip install --no-deps liger-kernel cut-cross-entropy`)."]
    return out + [peers_check.markdown(rows)]


def render(meta: dict[str, Any], rows: list[Row], peers_result: dict[str, Any] | None,
           dist_result: dict[str, Any] | None = None) -> str:
    """Header + one table per section, ready to paste into benchmarks/RESULTS.md."""
    load = meta.get("load_average")
    lines = [
        f"**{meta['device']}** — {meta['date']} — {meta['versions']}",
        "",
        f"Command: `{meta['command']}` ({meta['elapsed_s']:.0f} s"
        + (f"; 1-minute load average {load[0]:.2f} before, {meta['load_average_after'][0]:.2f} after" if load else "")
        + f"). auto backend: `{meta['auto_backend']}`. Memory method check: a 256 MiB tensor reads as "
        + (f"{meta['memory_method_check_mib_of_256']:.1f} MiB." if meta["memory_method_check_mib_of_256"] else "n/a."),
    ]
    for part in (ce_tables(rows, meta), linear_table(rows, meta), group_table(rows, meta),
                 dist.markdown(dist_result) if dist_result is not None else [], peers_table(peers_result)):
        if part:
            lines += [""] + part
    if meta["skipped"]:
        lines += ["", "Not run: " + "; ".join(f"`{k}` ({why})" for k, why in meta["skipped"].items()) + "."]
    return "\n".join(lines)


def write_plots(rows: list[Row], meta: dict[str, Any], out: Path) -> list[Path]:
    """PNG plots of time and peak extra memory against V and N, one line per implementation."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written: list[Path] = []
    specs = [("ce", "v", "n", meta["n"], "ce_vs_v.png", "V (vocabulary)"),
             ("ce", "n", "v", meta["v"], "ce_vs_n.png", "N (tokens)")]
    lin_main = meta.get("linear_main")
    if lin_main:
        specs.append(("linear", "v", "n", lin_main[0], "linear_vs_v.png", "V (vocabulary)"))
    for section, x_attr, fixed_attr, fixed, name, xlabel in specs:
        sel = [r for r in rows if r.section == section and getattr(r, fixed_attr) == fixed and r.median_ms
               and (section != "linear" or r.h == lin_main[2])]
        if len({getattr(r, x_attr) for r in sel}) < 2:
            continue
        phases = list(dict.fromkeys(r.phase for r in sel))
        fig, axes = plt.subplots(2, len(phases), figsize=(5 * len(phases), 7), squeeze=False)
        for j, phase in enumerate(phases):
            for impl, title in dict.fromkeys((r.impl, r.title) for r in sel if r.phase == phase):
                pts = sorted((getattr(r, x_attr), r.median_ms, r.extra_mib) for r in sel
                             if r.phase == phase and r.impl == impl)
                if len(pts) < 2:
                    continue
                xs = [p[0] for p in pts]
                axes[0][j].plot(xs, [p[1] for p in pts], marker="o", label=title)
                axes[1][j].plot(xs, [p[2] if p[2] is not None else math.nan for p in pts], marker="o", label=title)
            axes[0][j].set_title(f"{section}: {phase} ({fixed_attr.upper()}={fixed})")
            axes[0][j].set_ylabel("median ms")
            axes[1][j].set_ylabel("peak extra MiB")
            xs_all = sorted({getattr(r, x_attr) for r in sel if r.phase == phase})
            mem_max = max([r.extra_mib or 0.0 for r in sel if r.phase == phase] + [1.0])
            for ax in (axes[0][j], axes[1][j]):
                ax.set_xlabel(xlabel)
                ax.set_xscale("log")
                ax.set_xticks(xs_all, [str(x) for x in xs_all])
                ax.minorticks_off()
                ax.grid(True, alpha=0.3)
            axes[0][j].set_yscale("log")
            # symlog: 0 MiB (our in-place rows) and 1500 MiB (eager) on one readable axis
            axes[1][j].set_yscale("symlog", linthresh=1.0)
            axes[1][j].set_ylim(0, 2 * mem_max)
            if axes[0][j].get_legend_handles_labels()[0]:
                axes[0][j].legend(fontsize=7)
        fig.suptitle(f"{meta['device']} — {meta['dtype']}", fontsize=9)
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written
