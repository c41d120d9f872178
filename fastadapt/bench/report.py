"""What ``fastadapt bench`` writes: the ratios of each case, the table printed as it goes,
RESULTS.md, the JSON of raw numbers and the PNG plots. Everything here reads the plain result
dicts that the runner fills (and that ``results.json`` holds), so a report can be redrawn from a
saved JSON."""

from __future__ import annotations

import json
import pathlib

FUSED_PREFIX = "fastadapt["


def floor_ms(case: dict) -> float | None:
    """The case's floor in ms: computed (HBM traffic) or the median of its floor variant."""
    if case.get("floor_ms") is not None:
        return case["floor_ms"]
    return case.get("variants", {}).get(case.get("floor"), {}).get("p50")


def fused_variant(case: dict) -> str | None:
    """The headline fused variant: the first fastadapt backend that was measured."""
    for name, v in case.get("variants", {}).items():
        if name.startswith(FUSED_PREFIX) and "p50" in v:
            return name
    return None


def ratios(case: dict) -> dict[str, dict[str, float | None]]:
    """Per measured variant: ``x_floor`` (its median over the floor) and ``speedup`` (its median
    over the headline fused variant's: how much faster fastadapt is than this one)."""
    floor = floor_ms(case)
    fused = fused_variant(case)
    fused_ms = case["variants"][fused]["p50"] if fused else None
    out = {}
    for name, v in case.get("variants", {}).items():
        if "p50" not in v:
            continue
        out[name] = {"x_floor": v["p50"] / floor if floor else None,
                     "speedup": v["p50"] / fused_ms if fused_ms else None}
    return out


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _ms(v: dict) -> str:
    return f"{v['p50']:.4g} ({v['p20']:.4g} / {v['p80']:.4g})"


def variant_cells(case: dict, name: str) -> list[str]:
    """[variant, median (p20 / p80) ms, x floor, fastadapt faster by, peak MiB] of one variant."""
    v = case["variants"][name]
    if "p50" not in v:
        return [name, v.get("error") or v.get("skipped", ""), "", "", ""]
    r = ratios(case)[name]
    faster = "-" if name == fused_variant(case) else _x(r["speedup"])
    peak = "-" if v.get("peak_mib") is None else f"{v['peak_mib']:.0f}"
    return [name, _ms(v), _x(r["x_floor"]), faster, peak]


VARIANT_COLUMNS = ["variant", "median ms (p20 / p80)", "x floor", "fastadapt faster by", "peak MiB"]


def case_table(case: dict):
    """The rich table of one case, printed as soon as it is measured."""
    from rich.markup import escape
    from rich.table import Table

    floor = floor_ms(case)
    title = escape(f"{case['op']}: {case['name']}")
    if floor is not None:
        title += "  [dim]" + escape(f"({case['floor']}: {floor:.4g} ms)") + "[/]"
    table = Table(title=title, title_justify="left")
    for col in VARIANT_COLUMNS:
        table.add_column(col, no_wrap=True)
    for name in case.get("variants", {}):
        table.add_row(*map(escape, variant_cells(case, name)))
    return table


def summary_cells(case: dict) -> list[str]:
    """[case, fastadapt median ms, x floor, fastadapt's speedup over each baseline] of one case."""
    label = f"{case['op']}: {case['name']}"
    if case["status"] != "ok":
        return [label, case["status"], "", case.get("error", "")]
    fused = fused_variant(case)
    if fused is None:
        return [label, "no fused variant measured", "", ""]
    r = ratios(case)
    over = ", ".join(f"{n} {_x(v['speedup'])}" for n, v in r.items()
                     if not n.startswith(FUSED_PREFIX) and n != case["floor"])
    return [label, f"{case['variants'][fused]['p50']:.4g}", _x(r[fused]["x_floor"]), over or "-"]


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"
    return [line(header), line(["---"] * len(header)), *(line(r) for r in rows), ""]


def _fmt_err(value) -> str:
    return "-" if value is None else f"{value:.1e}"


def markdown(results: dict) -> str:
    """RESULTS.md: the machine, the verification, a summary line per case, then every case's table."""
    meta = results["meta"]
    lines = ["# fastadapt bench", ""]
    lines += [f"- device: {meta['device_name']} ({meta['device']})",
              "- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
              f"- date: {meta['date']}",
              f"- command: `{meta['command']}`",
              f"- timing dtype: {meta['dtype']}; timer: {meta['timer']}"]
    if meta.get("bandwidth_GBps"):
        lines.append(f"- measured copy bandwidth (for the HBM floors): {meta['bandwidth_GBps']:.0f} GB/s")
    lines += [f"- {note}" for note in meta.get("notes", [])]
    lines += ["", "Ratios, not absolute times, are what compare across runs. `x floor`: the variant's median "
              "over the case's floor; `fastadapt faster by`: the variant's median over the headline fused "
              "variant's (the first `fastadapt[...]` row). `peak MiB`: what one step allocates at its peak "
              "beyond what was allocated before it (CUDA only).", ""]

    lines += ["## Verification against float64", ""]
    rows = [[v["check"], v["shape"], v["backend"], v["dtype"], _fmt_err(v.get("output_err")),
             _fmt_err(v.get("grad_err")), v["bound"], v["status"], v.get("detail", "")]
            for v in results["verify"]]
    lines += _md_table(["check", "shape", "backend", "dtype", "output err", "worst grad err", "bound", "status",
                        "detail"], rows)

    lines += ["## Summary", ""]
    lines += _md_table(["case", "fastadapt median ms", "x floor", "fastadapt faster than"],
                       [summary_cells(c) for c in results["cases"]])

    lines += ["## Cases", ""]
    for case in results["cases"]:
        lines.append(f"### {case['op']}: {case['name']}")
        lines.append("")
        if case["status"] != "ok":
            lines += [f"{case['status']}: {case.get('error', '')}", ""]
            if not case.get("variants"):
                continue
        floor = floor_ms(case)
        if floor is not None:
            lines += [f"{case['floor']}: {floor:.4g} ms", ""]
        lines += _md_table(VARIANT_COLUMNS, [variant_cells(case, n) for n in case.get("variants", {})])
    return "\n".join(lines)


def write(results: dict, out: pathlib.Path) -> None:
    """RESULTS.md and results.json in ``out`` (rewritten after every case: a run cut short keeps
    what it measured)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "RESULTS.md").write_text(markdown(results))


def _family(name: str) -> str:
    if name.startswith(FUSED_PREFIX):
        return name
    for family in ("peft", "eager", "torch.compile"):
        if name.lower().startswith(family):
            return {"peft": "PEFT"}.get(family, family)
    return name


def lora_sweep_points(results: dict) -> tuple[str, dict[str, list[tuple[int, float]]]] | None:
    """LoRA training steps without dropout at the (K, N, r) measured at the most values of M: a
    title and, per series (fused, PEFT, floor), the (M, median ms) points; None below 2 points."""
    groups: dict[tuple, list[dict]] = {}
    for case in results["cases"]:
        p = case["params"]
        if case["op"] == "lora" and p.get("kind") == "train" and not p.get("p") and case["status"] == "ok":
            groups.setdefault((p["K"], p["N"], p["r"]), []).append(case)
    if not groups:
        return None
    (K, N, r), cases = max(groups.items(), key=lambda kv: len(kv[1]))
    if len(cases) < 2:
        return None
    series: dict[str, list[tuple[int, float]]] = {}
    for case in sorted(cases, key=lambda c: c["params"]["M"]):
        fused = fused_variant(case)
        for label, name in (("fastadapt", fused), ("PEFT", "peft"), ("floor: frozen matmul", case["floor"])):
            v = case["variants"].get(name or "", {})
            if "p50" in v:
                series.setdefault(label, []).append((case["params"]["M"], v["p50"]))
    return f"LoRA fwd+bwd, {K}x{N}, r={r}", series


def plot(results: dict, out: pathlib.Path) -> list[str]:
    """ratio_to_floor.png and lora_vs_m.png in ``out``; returns the files written. Raises
    ImportError without matplotlib (the ``[bench]`` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    meta = results["meta"]
    cases = [c for c in results["cases"] if c["status"] == "ok" and floor_ms(c)]
    if cases:
        families = []
        for c in cases:
            for name in ratios(c):
                if name != c["floor"] and _family(name) not in families:
                    families.append(_family(name))
        height = 0.8 / len(families)
        fig, ax = plt.subplots(figsize=(10, max(3.0, 0.5 + 0.45 * len(cases) * max(1, len(families) / 2))))
        for j, family in enumerate(families):
            ys, xs = [], []
            for i, c in enumerate(cases):
                for name, r in ratios(c).items():
                    if name != c["floor"] and _family(name) == family:
                        ys.append(i + j * height)
                        xs.append(r["x_floor"])
            ax.barh(ys, xs, height=height, label=family)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_yticks([i + 0.4 - height / 2 for i in range(len(cases))])
        ax.set_yticklabels([f"{c['op']}: {c['name']}" for c in cases], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("median time / floor (1 = the floor)")
        ax.set_title(f"{meta['device_name']}, {meta['dtype']}", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "ratio_to_floor.png", dpi=110)
        plt.close(fig)
        written.append("ratio_to_floor.png")
    sweep = lora_sweep_points(results)
    if sweep is not None:
        title, series = sweep
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, points in series.items():
            ax.plot([m for m, _ in points], [t for _, t in points], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel("median ms")
        ax.set_title(f"{title}; {meta['device_name']}, {meta['dtype']}", fontsize=9)
        ax.legend()
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "lora_vs_m.png", dpi=110)
        plt.close(fig)
        written.append("lora_vs_m.png")
    return written
