"""Turns the benchmark's records into results.csv, outage.png and summary.md.

A record is one repetition of one experiment at one setting:
{"experiment", "setting", "ktime_ms", "kcount", "budget_s", "rep", "status", "error", "metrics": {...}}

A setting with a witness ("1s x 3 + witness") keeps keepalive_time x keepalive_count as its budget
(chart, targets, budget_s); its lease time 3 x keepalive_time + 200 ms (whatever keepalive_count)
is shown next to it in summary.md.
"""

from __future__ import annotations

import csv
import math
import os
import statistics

EXT_PATH = "/usr/lib/postgresql/15/lib/pg_keeper_rs.so"

# Targets from the issue.
PRIMARY_SLACK_S = 0.2
PRIMARY_100MS_CAP_S = 0.5
STANDBY_SLACK_S = 0.3
# A planned restart of the primary: writes stop for the restart itself, not for the standby's
# wal_retrieve_retry_interval (5 s by default) on top of it.
RESTART_OUTAGE_LIMIT_S = 1.0
PGBENCH_MIN_RATIO = 0.99
RSS_LIMIT_MB = 20.0


def values(records, experiment, setting, metric) -> list[float]:
    out = []
    for r in records:
        if r["experiment"] == experiment and r["setting"] == setting and r["status"] == "ok":
            v = r["metrics"].get(metric)
            if v is not None and not (isinstance(v, float) and math.isnan(v)):
                out.append(float(v))
    return out


def stats(vals: list[float]) -> tuple[float, float, float] | None:
    if not vals:
        return None
    return statistics.median(vals), min(vals), max(vals)


def cell(vals: list[float], fmt: str = "{:.2f}") -> str:
    st = stats(vals)
    if st is None:
        return "n/a"
    med, lo, hi = st
    if len(vals) == 1:
        return fmt.format(med)
    return f"{fmt.format(med)} ({fmt.format(lo)}–{fmt.format(hi)})"


def count_reps(records, experiment, setting) -> str:
    rs = [r for r in records if r["experiment"] == experiment and r["setting"] == setting]
    ok = sum(r["status"] == "ok" for r in rs)
    return f"{ok}/{len(rs)}" if rs else "-"


# ---------------------------------------------------------------- CSV

def write_csv(path: str, records) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["experiment", "setting", "keepalive_time_ms", "keepalive_count", "budget_s", "rep",
                    "extension_sha256", "status", "metric", "value", "error"])
        for r in records:
            base = [r["experiment"], r["setting"], r["ktime_ms"], r["kcount"], r["budget_s"], r["rep"],
                    r.get("build", ""), r["status"]]
            if r["status"] != "ok" or not r["metrics"]:
                w.writerow(base + ["", "", r.get("error", "")])
                continue
            for k, v in r["metrics"].items():
                if isinstance(v, float):
                    v = "" if math.isnan(v) else f"{v:.6g}"
                w.writerow(base + [k, v, ""])


# ---------------------------------------------------------------- tables

def any_witness(settings) -> bool:
    return any(s.witness for s in settings)


def failover_table(records, settings) -> str:
    lease_col = any_witness(settings)
    head = ("| setting | budget s " + ("| lease s " if lease_col else "")
            + "| primary crash: outage s | detection s | promotion s | reconnection s "
            "| lost commits | standby crash: stall s | detection s | reps ok (primary/standby) |")
    rows = [head, "|" + "---|" * (11 if lease_col else 10)]
    for s in settings:
        P, S = "primary_crash", "standby_crash"
        lost = values(records, P, s.label, "lost_commits")
        lease = (f"| {s.lease:g} " if s.witness else "| - ") if lease_col else ""
        rows.append(
            f"| {s.label} | {s.budget:g} {lease}| {cell(values(records, P, s.label, 'outage_s'))} "
            f"| {cell(values(records, P, s.label, 'detection_s'))} "
            f"| {cell(values(records, P, s.label, 'promotion_s'))} "
            f"| {cell(values(records, P, s.label, 'reconnection_s'))} "
            f"| {int(sum(lost)) if lost else 'n/a'} "
            f"| {cell(values(records, S, s.label, 'stall_s'))} "
            f"| {cell(values(records, S, s.label, 'detection_s'))} "
            f"| {count_reps(records, P, s.label)} / {count_reps(records, S, s.label)} |")
    return "\n".join(rows)


def witness_table(records, settings) -> str:
    """The lease steps of the witness settings, in seconds after the kill."""
    head = ("| setting | lease s | primary crash: node1's last renewal | its lease expires "
            "| node2 waits for the lease | node2 takes it | outage after the expiry "
            "| standby crash: node1 records no sync standby |")
    rows = [head, "|" + "---|" * 8]
    P, S = "primary_crash", "standby_crash"
    for s in settings:
        if not s.witness:
            continue
        rows.append(
            f"| {s.label} | {s.lease:g} | {cell(values(records, P, s.label, 'lease_last_renewal_s'))} "
            f"| {cell(values(records, P, s.label, 'lease_expiry_s'))} "
            f"| {cell(values(records, P, s.label, 'lease_held_line_s'))} "
            f"| {cell(values(records, P, s.label, 'lease_taken_s'))} "
            f"| {cell(values(records, P, s.label, 'outage_after_expiry_s'))} "
            f"| {cell(values(records, S, s.label, 'lease_released_line_s'))} |")
    return "\n".join(rows)


def _lease_cell(s) -> str:
    return f"{s.lease:g}" if s.witness else "-"


def _count(records, experiment, setting, metric) -> str:
    v = values(records, experiment, setting, metric)
    return str(int(sum(v))) if v else "n/a"


def frozen_table(records, settings) -> str:
    E = "frozen_primary"
    head = ("| setting | budget s | lease s | outage s | detection s | promotion s | reconnection s "
            "| after the thaw: `superseded` line s | node1 gone s | lost commits | reps ok |")
    rows = [head, "|" + "---|" * 11]
    for s in settings:
        if not any(r["experiment"] == E and r["setting"] == s.label for r in records):
            continue
        rows.append(
            f"| {s.label} | {s.budget:g} | {_lease_cell(s)} | {cell(values(records, E, s.label, 'outage_s'))} "
            f"| {cell(values(records, E, s.label, 'detection_s'))} "
            f"| {cell(values(records, E, s.label, 'promotion_s'))} "
            f"| {cell(values(records, E, s.label, 'reconnection_s'))} "
            f"| {cell(values(records, E, s.label, 'fenced_line_s'))} "
            f"| {cell(values(records, E, s.label, 'fenced_gone_s'))} "
            f"| {_count(records, E, s.label, 'lost_commits')} "
            f"| {count_reps(records, E, s.label)} |")
    return "\n".join(rows)


def cut_table(records, settings) -> str:
    E = "cut_link"
    head = ("| setting | budget s | lease s | stall s | detection s | node2 promoted (reps) "
            "| both writable s | node1 acks after node2's promotion | lost commits "
            "| heal: node1 `superseded` s | heal: node1 gone s | heal: sync restored s | reps ok |")
    rows = [head, "|" + "---|" * 13]
    for s in settings:
        if not any(r["experiment"] == E and r["setting"] == s.label for r in records):
            continue
        promoted = values(records, E, s.label, "node2_promoted")
        rows.append(
            f"| {s.label} | {s.budget:g} | {_lease_cell(s)} | {cell(values(records, E, s.label, 'stall_s'))} "
            f"| {cell(values(records, E, s.label, 'detection_s'))} "
            f"| {f'{int(sum(promoted))} of {len(promoted)}' if promoted else 'n/a'} "
            f"| {cell(values(records, E, s.label, 'both_writable_s'))} "
            f"| {cell(values(records, E, s.label, 'node1_acks_after_promotion'), '{:.0f}')} "
            f"| {_count(records, E, s.label, 'lost_commits')} "
            f"| {cell(values(records, E, s.label, 'heal_fenced_line_s'))} "
            f"| {cell(values(records, E, s.label, 'heal_node1_gone_s'))} "
            f"| {cell(values(records, E, s.label, 'heal_sync_restored_s'))} "
            f"| {count_reps(records, E, s.label)} |")
    return "\n".join(rows)


def restart_table(records, settings) -> str:
    E, END = "planned_restart", "planned_restart_end"
    head = ("| setting | budget s | restarts ok | `pg_ctl restart` s | server down s | write outage s "
            "| outage max s | writes resumed after `pg_ctl` returned s | node2: grace line s | node2: WAL receiver "
            "woken s | node2 streams again s | pair steady again s | failovers | lost commits |")
    rows = [head, "|" + "---|" * 14]
    for s in settings:
        if not any(r["experiment"] == E and r["setting"] == s.label for r in records):
            continue
        outage = values(records, E, s.label, "outage_s")
        failovers = values(records, E, s.label, "failover")
        rows.append(
            f"| {s.label} | {s.budget:g} | {count_reps(records, E, s.label)} "
            f"| {cell(values(records, E, s.label, 'restart_s'))} "
            f"| {cell(values(records, E, s.label, 'server_down_s'))} "
            f"| {cell(outage)} | {f'{max(outage):.2f}' if outage else 'n/a'} "
            f"| {cell(values(records, E, s.label, 'resumed_after_pg_ctl_s'))} "
            f"| {cell(values(records, E, s.label, 'grace_line_s'))} "
            f"| {cell(values(records, E, s.label, 'woken_line_s'))} "
            f"| {cell(values(records, E, s.label, 'node2_streaming_s'))} "
            f"| {cell(values(records, E, s.label, 'steady_again_s'))} "
            f"| {f'{int(sum(failovers))} of {len(failovers)}' if failovers else 'n/a'} "
            f"| {_count(records, END, s.label, 'lost_commits')} |")
    return "\n".join(rows)


def overhead_table(records, settings) -> str:
    head = ("| setting | CPU s/h, primary keeper | CPU s/h, standby keeper | CPU s/h, both keepers (scheduler) "
            "| CPU s/h, heartbeat backends | RSS MB, primary keeper | RSS MB, standby keeper "
            "| private (anon) RSS MB, max | WAL kB/h, idle primary | WAL bytes per keepalive_time | windows ok |")
    rows = [head, "|" + "---|" * 11]
    E = "overhead"
    for s in settings:
        both = [a + b for a, b in zip(values(records, E, s.label, "primary_keeper_sched_cpu_s_per_h"),
                                      values(records, E, s.label, "standby_keeper_sched_cpu_s_per_h"))]
        anon = [max(a, b) for a, b in zip(values(records, E, s.label, "primary_keeper_anon_mb"),
                                          values(records, E, s.label, "standby_keeper_anon_mb"))]
        rows.append(
            f"| {s.label} | {cell(values(records, E, s.label, 'primary_keeper_cpu_s_per_h'))} "
            f"| {cell(values(records, E, s.label, 'standby_keeper_cpu_s_per_h'))} "
            f"| {cell(both)} "
            f"| {cell(values(records, E, s.label, 'heartbeat_backends_sched_cpu_s_per_h'))} "
            f"| {cell(values(records, E, s.label, 'primary_keeper_rss_mb'), '{:.1f}')} "
            f"| {cell(values(records, E, s.label, 'standby_keeper_rss_mb'), '{:.1f}')} "
            f"| {cell(anon, '{:.1f}')} "
            f"| {cell([v / 1024 for v in values(records, E, s.label, 'primary_wal_bytes_per_h')], '{:.0f}')} "
            f"| {cell(values(records, E, s.label, 'primary_wal_bytes_per_keepalive'), '{:.0f}')} "
            f"| {count_reps(records, E, s.label)} |")
    return "\n".join(rows)


def pgbench_table(records) -> str:
    head = ("| keeper setting | pairs ok | tps with pg_keeper_rs | tps without | ratio with/without "
            "| keeper heartbeat failures under load |")
    rows = [head, "|" + "---|" * 6]
    labels = sorted({r["setting"] for r in records if r["experiment"] == "pgbench"})
    for lab in labels:
        ev = values(records, "pgbench", lab, "keeper_events_under_load")
        rows.append(
            f"| {lab} | {count_reps(records, 'pgbench', lab)} "
            f"| {cell(values(records, 'pgbench', lab, 'tps_with'), '{:.0f}')} "
            f"| {cell(values(records, 'pgbench', lab, 'tps_without'), '{:.0f}')} "
            f"| {cell(values(records, 'pgbench', lab, 'ratio'), '{:.3f}')} "
            f"| {int(sum(ev)) if ev else 'n/a'} |")
    return "\n".join(rows)


# ---------------------------------------------------------------- targets

def targets(records, settings) -> list[str]:
    out = []
    ran = {r["experiment"] for r in records}

    def judge(name, value, limit, higher_is_better=False, unit="s"):
        if value is None:
            out.append(f"- **not measured**: {name}")
            return
        ok = value >= limit if higher_is_better else value <= limit
        by = abs(value - limit)
        fmt = "{:.3f}" if unit in ("", "x") else "{:.2f}"
        verdict = "met" if ok else "MISSED"
        margin = f"by {fmt.format(by)}{unit} {'to spare' if ok else 'too ' + ('low' if higher_is_better else 'high')}"
        out.append(f"- **{verdict}**: {name}: {fmt.format(value)}{unit} vs limit {fmt.format(limit)}{unit} ({margin})")

    for s in (settings if "primary_crash" in ran else []):
        st = stats(values(records, "primary_crash", s.label, "outage_s"))
        judge(f"primary crash outage median at {s.label} <= budget + {PRIMARY_SLACK_S}s",
              st[0] if st else None, s.budget + PRIMARY_SLACK_S)
        if s.ktime_ms == 100 and s.kcount == 3:
            judge(f"primary crash outage median at {s.label} <= {PRIMARY_100MS_CAP_S}s",
                  st[0] if st else None, PRIMARY_100MS_CAP_S)
        if s.witness:
            # Not a target of the issue: with a witness the standby also waits for the dead
            # primary's lease to expire, up to the lease time after its last renewal.
            judge(f"(witness, expected) primary crash outage median at {s.label} <= lease time + "
                  f"{PRIMARY_SLACK_S}s", st[0] if st else None, s.lease + PRIMARY_SLACK_S)
    lost_all = [v for s in settings for v in values(records, "primary_crash", s.label, "lost_commits")]
    if lost_all:
        total = int(sum(lost_all))
        out.append(f"- **{'met' if total == 0 else 'MISSED'}**: 0 acknowledged commits lost in primary crashes: "
                   f"{total} lost over {len(lost_all)} crashes")
    elif "primary_crash" in ran:
        out.append("- **not measured**: acknowledged commits lost in primary crashes")
    frozen_lost = [v for s in settings for v in values(records, "frozen_primary", s.label, "lost_commits")]
    if frozen_lost:
        total = int(sum(frozen_lost))
        out.append(f"- **{'met' if total == 0 else 'MISSED'}**: 0 acknowledged commits lost with a frozen primary: "
                   f"{total} lost over {len(frozen_lost)} freezes")
    for s in settings:
        n = len([r for r in records if r["experiment"] == "frozen_primary" and r["setting"] == s.label
                 and r["status"] == "ok"])
        if n:
            fenced = values(records, "frozen_primary", s.label, "fenced_gone_s")
            out.append(f"- **{'met' if len(fenced) == n else 'MISSED'}**: frozen primary at {s.label}: the thawed "
                       f"old primary fenced itself and exited in {len(fenced)} of {n} repetitions")
    for s in (settings if "cut_link" in ran else []):
        if not s.witness:
            continue
        promoted = values(records, "cut_link", s.label, "node2_promoted")
        if promoted:
            n = int(sum(promoted))
            out.append(f"- **{'met' if n == 0 else 'MISSED'}**: cut link at {s.label}: the standby did not promote "
                       f"while the primary held the lease: promoted in {n} of {len(promoted)} cuts")
        lost = values(records, "cut_link", s.label, "lost_commits")
        if lost:
            out.append(f"- **{'met' if sum(lost) == 0 else 'MISSED'}**: cut link at {s.label}: 0 acknowledged "
                       f"commits lost: {int(sum(lost))} lost over {len(lost)} cuts")
        st = stats(values(records, "cut_link", s.label, "stall_s"))
        judge(f"cut link at {s.label}: commit stall median <= budget + {STANDBY_SLACK_S}s",
              st[0] if st else None, s.budget + STANDBY_SLACK_S)
    for s in (settings if "standby_crash" in ran else []):
        st = stats(values(records, "standby_crash", s.label, "stall_s"))
        judge(f"standby crash stall median at {s.label} <= budget + {STANDBY_SLACK_S}s",
              st[0] if st else None, s.budget + STANDBY_SLACK_S)
    for s in (settings if "planned_restart" in ran else []):
        failovers = values(records, "planned_restart", s.label, "failover")
        if failovers:
            n = int(sum(failovers))
            out.append(f"- **{'met' if n == 0 else 'MISSED'}**: planned restarts at {s.label} never failed over: "
                       f"failed over in {n} of {len(failovers)} restarts")
        lost = values(records, "planned_restart_end", s.label, "lost_commits")
        if lost:
            out.append(f"- **{'met' if sum(lost) == 0 else 'MISSED'}**: planned restarts at {s.label}: 0 acknowledged "
                       f"commits lost: {int(sum(lost))} lost over {len(failovers)} restarts")
        else:
            out.append(f"- **not measured**: acknowledged commits lost in planned restarts at {s.label}")
        st = stats(values(records, "planned_restart", s.label, "outage_s"))
        judge(f"planned restart write outage median at {s.label} < {RESTART_OUTAGE_LIMIT_S:g}s",
              st[0] if st else None, RESTART_OUTAGE_LIMIT_S)
    labels = sorted({r["setting"] for r in records if r["experiment"] == "pgbench"})
    if not labels and "pgbench" in ran:
        out.append("- **not measured**: pgbench with the extension within 1% of without")
    for lab in labels:
        st = stats(values(records, "pgbench", lab, "ratio"))
        judge(f"pgbench tps with the extension ({lab}) within 1% of without (median ratio >= {PGBENCH_MIN_RATIO})",
              st[0] if st else None, PGBENCH_MIN_RATIO, higher_is_better=True, unit="")
    rss = [v for s in settings for k in ("primary_keeper_rss_mb", "standby_keeper_rss_mb")
           for v in values(records, "overhead", s.label, k)]
    if "overhead" in ran:
        judge(f"keeper RSS (VmRSS, largest seen) < {RSS_LIMIT_MB:g} MB", max(rss) if rss else None,
              RSS_LIMIT_MB, unit=" MB")
    return out


# ---------------------------------------------------------------- chart

def chart(path: str, records, settings) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6.8), dpi=120)
    budgets = sorted({s.budget for s in settings})
    leases = [s.lease for s in settings if s.witness]
    lo_b, hi_b = min(budgets) * 0.6, max(budgets) * 1.6
    xs = [lo_b * (hi_b / lo_b) ** (i / 100) for i in range(101)]
    ax.plot(xs, xs, color="black", lw=1.2, label="floor: outage = budget")
    ax.plot(xs, [x + PRIMARY_SLACK_S for x in xs], color="tab:blue", lw=1, ls="--",
            label=f"target, primary crash: budget + {PRIMARY_SLACK_S}s")
    ax.plot(xs, [x + STANDBY_SLACK_S for x in xs], color="tab:orange", lw=1, ls=":",
            label=f"target, standby crash: budget + {STANDBY_SLACK_S}s")

    # (experiment, metric, legend, colour, marker, x shift, witness settings?)
    series = [("primary_crash", "outage_s", "primary crash: write outage", "tab:blue", "o", 0.94, False),
              ("standby_crash", "stall_s", "standby crash: commit stall", "tab:orange", "s", 1.06, False),
              ("primary_crash", "outage_s", "witness: primary crash, write outage", "tab:green", "D", 0.90, True),
              ("standby_crash", "stall_s", "witness: standby crash, commit stall", "tab:red", "^", 1.10, True)]
    if leases:
        ax.plot([s.budget for s in settings if s.witness], leases, ls="none", marker="_", ms=22, mew=2,
                color="dimgray", label="witness: lease time 3 × keepalive_time + 0.2 s")
    all_y = list(leases)
    for exp, metric, label, color, marker, shift, witness in series:
        px, py, lo, hi = [], [], [], []
        for s in settings:
            if s.witness != witness:
                continue
            st = stats(values(records, exp, s.label, metric))
            if st is None:
                continue
            med, mn, mx = st
            px.append(s.budget * shift)
            py.append(med)
            lo.append(med - mn)
            hi.append(mx - med)
            all_y += [mn, mx]
        if px:
            ax.errorbar(px, py, yerr=[lo, hi], fmt=marker, color=color, ms=7, capsize=4, lw=1.5,
                        label=label + " (median, min–max)")
    for s in settings:
        measured = any(values(records, exp, s.label, metric) for exp, metric, *_ in series)
        # A witness setting is labelled at its lease time, so that it does not cover the label of
        # the same setting without a witness.
        ax.annotate(s.label + ("" if measured else " (no data)"), (s.budget, s.lease if s.witness else s.budget),
                    textcoords="offset points", xytext=(8, 6 if s.witness else -14), fontsize=9,
                    color="dimgray" if measured else "tab:red")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo_b, hi_b)
    ymin = min([lo_b] + all_y) * 0.8
    ymax = max([hi_b + STANDBY_SLACK_S] + all_y) * 1.25
    ax.set_ylim(ymin, ymax)
    ticks = [0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1, 2, 3, 5, 10, 20, 30, 60]
    ax.set_xticks([t for t in ticks if lo_b <= t <= hi_b])
    ax.set_yticks([t for t in ticks if ymin <= t <= ymax])
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.get_yaxis().set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("detection budget = keepalive_time × keepalive_count (s)")
    ax.set_ylabel("time without acknowledged commits (s)")
    ax.set_title("pg_keeper_rs: outage after kill -9 vs detection budget"
                 + (" (with and without a witness)" if leases and len(leases) < len(settings) else
                    " (with a witness)" if leases else ""))
    ax.grid(True, which="major", alpha=0.4)
    ax.grid(True, which="minor", alpha=0.12)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize=9, frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def restart_chart(path: str, records, settings) -> None:
    """The write outage and the `pg_ctl restart` duration of every planned restart, per setting."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    E = "planned_restart"
    shown = [s for s in settings if values(records, E, s.label, "outage_s")]
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=120)
    series = [("outage_s", "write outage", "tab:blue", "o", -0.12),
              ("restart_s", "pg_ctl restart duration", "tab:gray", "s", 0.12)]
    for metric, label, color, marker, dx in series:
        xs, ys, mx, my = [], [], [], []
        for i, s in enumerate(shown):
            v = values(records, E, s.label, metric)
            xs += [i + dx + 0.05 * ((k % 5) - 2) / 2 for k in range(len(v))]
            ys += v
            mx.append(i + dx)
            my.append(statistics.median(v))
        ax.plot(xs, ys, ls="none", marker=marker, color=color, alpha=0.45, ms=5, label=label + " (each restart)")
        ax.plot(mx, my, ls="none", marker="_", color=color, ms=26, mew=2.5, label=label + " (median)")
    ax.axhline(RESTART_OUTAGE_LIMIT_S, color="tab:green", lw=1, ls="--",
               label=f"target: write outage median < {RESTART_OUTAGE_LIMIT_S:g} s")
    top = max([RESTART_OUTAGE_LIMIT_S] + [v for s in shown for m, *_ in series for v in values(records, E, s.label, m)])
    if top >= 5.0:
        ax.axhline(5.0, color="tab:red", lw=1, ls=":", label="wal_retrieve_retry_interval (5 s)")
    for i, s in enumerate(shown):
        f = values(records, E, s.label, "failover")
        ax.annotate(f"failovers: {int(sum(f))} of {len(f)}", (i, top * 1.2), textcoords="offset points",
                    xytext=(0, -14), ha="center", fontsize=9, color="tab:red" if sum(f) else "dimgray")
    ax.set_xticks(range(len(shown)))
    ax.set_xticklabels([s.label for s in shown])
    ax.set_xlim(-0.6, len(shown) - 0.4)
    ax.set_ylim(0, top * 1.25)
    ax.set_xlabel("setting (keepalive_time × keepalive_count)")
    ax.set_ylabel("seconds")
    ax.set_title("pg_keeper_rs: planned restart of the primary (pg_ctl restart -m fast) under writes")
    ax.grid(True, axis="y", alpha=0.4)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, fontsize=8.5, frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def observations(records, settings) -> list[str]:
    """Facts worth a line that the tables hide."""
    out = []
    for s in settings:
        E = "planned_restart"
        n = len(values(records, E, s.label, "outage_s"))
        if not n:
            continue
        woken = values(records, E, s.label, "woken_line_s")
        grace = values(records, E, s.label, "grace_line_s")
        if len(woken) < n or len(grace) < n:
            out.append(f"{s.label}: of {n} planned restarts, node2's keeper logged `announced a clean shutdown` "
                       f"in {len(grace)} and `is back after its restart; starting this standby's WAL receiver "
                       f"at once` in {len(woken)}")
        slow = [(r["rep"], r["metrics"]["outage_s"]) for r in records
                if r["experiment"] == E and r["setting"] == s.label and r["status"] == "ok"
                and r["metrics"].get("outage_s", 0) > 2 * RESTART_OUTAGE_LIMIT_S]
        if slow:
            out.append(f"{s.label}: write outage above {2 * RESTART_OUTAGE_LIMIT_S:g} s in {len(slow)} of {n} planned "
                       f"restarts ({', '.join(f'#{rep}: {v:.2f}s' for rep, v in slow)}); keeper_lines.log has "
                       "their lines")
    slow = [(r["setting"], r["rep"], r["metrics"]["promotion_s"]) for r in records
            if r["experiment"] == "primary_crash" and r["status"] == "ok"
            and r["metrics"].get("promotion_s", 0) > 1.0]
    total = sum(r["experiment"] == "primary_crash" and r["status"] == "ok" for r in records)
    if slow:
        out.append(f"promotion took more than 1 s in {len(slow)} of {total} primary crashes "
                   f"({', '.join(f'{st} rep {rep}: {v:.2f}s' for st, rep, v in slow)}); "
                   "keeper_lines.log shows node2's recovery lines for each")
    for s in settings:
        if s.witness:
            held = values(records, "primary_crash", s.label, "lease_held_line_s")
            expiry = values(records, "primary_crash", s.label, "lease_expiry_s")
            taken = values(records, "primary_crash", s.label, "lease_taken_s")
            n = len(values(records, "primary_crash", s.label, "outage_s"))
            if n:
                out.append(f"{s.label}: in {len(held)} of {n} primary crashes node2 logged that it could not "
                           "take the lease yet (`not promoting: ... the lease on the witness cannot be taken`)"
                           + (f", median {statistics.median(held):.2f}s after the kill" if held else "")
                           + (f"; node1's lease expired a median {statistics.median(expiry):.2f}s after the kill "
                              f"and node2 took it at {statistics.median(taken):.2f}s" if expiry and taken else ""))
        det = values(records, "primary_crash", s.label, "detection_s") + \
            values(records, "standby_crash", s.label, "detection_s")
        if s.witness:
            det = values(records, "standby_crash", s.label, "detection_s")
        if det and statistics.median(det) < s.budget - 0.5 * s.ktime_ms / 1000:
            out.append(f"{s.label}: {'standby crash ' if s.witness else ''}detection median "
                       f"{statistics.median(det):.2f}s is below the budget "
                       f"{s.budget:g}s: kill -9 closes the heartbeat connection, which counts as a failed "
                       "heartbeat at once; the budget applies in full to a peer that stops answering "
                       "without closing connections")
    return out


# ---------------------------------------------------------------- summary

def summary(path: str, records, settings, machine: dict, run_info: dict) -> str:
    ran = {r["experiment"] for r in records}
    crashes = bool(ran & {"primary_crash", "standby_crash"})
    failover = failover_table(records, settings) if crashes else ""
    witness = witness_table(records, settings) if any_witness(settings) and crashes else ""
    frozen = frozen_table(records, settings) if "frozen_primary" in ran else ""
    cut = cut_table(records, settings) if "cut_link" in ran else ""
    restarts = restart_table(records, settings) if "planned_restart" in ran else ""
    overhead = overhead_table(records, settings) if "overhead" in ran else "Not run."
    pgb = pgbench_table(records) if "pgbench" in ran else "Not run."
    tg = targets(records, settings)
    failed = [r for r in records if r["status"] != "ok"]
    lines = [
        "# pg_keeper_rs failover benchmark",
        "",
        f"Run {run_info['started']} – {run_info['finished']} ({run_info['elapsed_min']:.1f} min), "
        f"command: `{run_info['command']}`.",
        f"Repetitions: {run_info['reps']} per setting and experiment; overhead: {run_info['overhead']}; "
        f"pgbench: {run_info['pgbench']}. keepalive_time written in {run_info['keepalive_unit']} "
        f"(e.g. '{'100ms' if run_info['keepalive_unit'] == 'ms' else '0.1s'}'). "
        f"Extra server settings: {run_info['extra_conf']}.",
        "",
        "## Machine",
        "",
        f"- CPU: {machine['cpu']} (`nproc` = {machine['nproc']})",
        f"- Memory (`free -g`):",
        "",
        "```",
        machine["free"].rstrip(),
        "```",
        "",
        f"- PostgreSQL: {machine['pg_version']}; kernel {machine['kernel']}",
        f"- Extension: {EXT_PATH}, {run_info['so_start']}"
        + ("" if run_info["so_end"] == run_info["so_start"] else f" at the start, {run_info['so_end']} at the end"),
        f"- Load average at start / end: {run_info['load_start']} / {run_info['load_end']} "
        "(the machine is shared; other work adds noise)",
        "",
    ]
    if failover:
        lines += [
        "## Failover (seconds; median (min–max) over the repetitions that succeeded)",
        "",
        failover,
        "",
        "- *outage*: last commit acknowledged by the old primary → first commit acknowledged by node2, "
        "for a client committing one row every 10 ms through "
        "`host=127.0.0.1,127.0.0.1 port=P1,P2 target_session_attrs=read-write connect_timeout=2`.",
        "- *detection*: kill → the standby's `lost; promoting this standby` log line (primary crash), "
        "or the primary's `lost; switching to asynchronous replication` line (standby crash).",
        "- *promotion*: that line → node2's `database system is ready to accept connections` "
        "(end of recovery; it accepts writes).",
        "- *reconnection*: the rest of the outage (the client noticing, reconnecting, and the 0–10 ms "
        "between the last commit and the kill).",
        "- *lost commits*: acknowledged ids missing on the new primary, summed over all repetitions.",
        "- *stall*: longest gap between acknowledged commits on the primary after the standby's kill.",
        "",
        ]
    if witness:
        lines += [
            "## Witness (seconds after the kill; median (min–max))",
            "",
            "Settings marked `+ witness` run a third, plain PostgreSQL server named by both nodes' "
            "`pg_keeper.witness_conninfo`; it holds the lease row (`pg_keeper_lease`). The primary renews "
            "the lease every `keepalive_time` for the *lease time* 3 × keepalive_time + 200 ms (whatever "
            "keepalive_count); "
            "the standby promotes only after the dead primary's lease has expired and it has taken it, so "
            "its *detection* above includes that wait. Every crash starts with the lease held by node1 "
            "with node2 as the synchronous standby. The *budget* stays keepalive_time × keepalive_count.",
            "",
            witness,
            "",
            "- *last renewal*, *lease expires*: node1's last `renewed_at`/`expires_at` in the lease row, "
            "read from the witness every 20 ms (the witness runs on the same clock).",
            "- *waits for the lease*: node2's `not promoting: ... the lease on the witness cannot be taken` "
            "line (absent when the lease had already expired when it counted its failures).",
            "- *takes it*: node2's `took the lease on the witness` line; *outage after the expiry*: the "
            "expiry → the first commit acknowledged by node2.",
            "- *records no sync standby*: node1's `recorded on the witness that no standby is synchronous` "
            "line, which precedes its switch to asynchronous replication.",
            "",
        ]
    if frozen:
        lines += [
            "## Frozen primary (seconds; median (min–max))",
            "",
            "The primary's postmaster and all its children get SIGSTOP under the same multihost client "
            "as the primary crash: the server hangs and closes no connection. The client gives up a "
            "commit after 1 s (it shuts its socket down) and reconnects; its attempts at the frozen "
            "node1 each wait for `connect_timeout=2` (psycopg's minimum), which is in *reconnection*. "
            "Once node2 has acknowledged a commit (plus 0.5 s) node1 gets SIGCONT.",
            "",
            frozen,
            "",
            "- *outage*: last commit acknowledged by node1 → first by node2; *detection*: freeze → node2's "
            "`lost; promoting` line (with a witness it includes the wait for node1's lease to expire); "
            "*promotion*: that line → node2's end of recovery; *reconnection*: the rest.",
            "- *`superseded` line*: thaw → node1's keeper's `superseded: ...; fencing this server` line; "
            "*node1 gone*: thaw → every process of node1 has exited.",
            "- *lost commits*: acknowledged ids missing on node2, summed over the repetitions (must be 0).",
            "",
        ]
    if cut:
        lines += [
            "## Cut link between the nodes (seconds; median (min–max))",
            "",
            "Everything the nodes send each other (both keepers' heartbeats, node2's replication) goes "
            "through two TCP proxies; the cut blackholes both (nothing forwarded or read, no socket "
            "closed). Both nodes still reach the witness, and a client writes to node1 directly. The cut "
            "is held until node1 has switched to asynchronous replication and node2 has promoted (no "
            "witness) or refused to (witness), and a while longer (with a witness the lease time + 2 × "
            "keepalive_time, at least 2 s; without, 2 × keepalive_time, at least 1 s); then it is healed.",
            "",
            cut,
            "",
            "- *stall*: longest gap between node1's acknowledged commits from the cut to the heal; "
            "*detection*: cut → node1's `lost; switching to asynchronous replication` line.",
            "- *node2 promoted*: repetitions in which node2 promoted during the cut (with a witness it must "
            "not: node1 keeps renewing the lease). Without a witness it does by design: *both writable* is "
            "node2's end of recovery → node1's `superseded` line after the heal; *node1 acks after node2's "
            "promotion* counts commits node1 acknowledged meanwhile, and *lost commits* the acknowledged ids "
            "missing on node2 (acknowledged by node1 while asynchronous; lost by design). With a witness "
            "*lost commits* are acknowledged ids missing on node1 (must be 0).",
            "- *heal*: without a witness, heal → node1's `superseded` line and → node1's processes gone; with "
            "one, heal → node1's `restored synchronous replication` line.",
            "",
        ]
    if restarts:
        lines += [
            "## Planned restart of the primary (seconds; median (min–max))",
            "",
            "One pair per setting, the multihost client of the primary crash committing all along; "
            "`pg_ctl restart -m fast -w` of node1's data directory (as the postgres OS user), repeated; "
            "before each, the pair is synchronous and steady again (node2 streaming with `sync_state = "
            "'sync'`, both keepers connected, node1's keeper trusting node2), then one keepalive_time and a "
            "random fraction of another pass, so that every restart lands at a random point of the heartbeat "
            "cycle with a standby that could promote. `pg_keeper.restart_grace` is at its default (30 s); "
            "`wal_retrieve_retry_interval` at its default (5 s) unless the extra settings above say otherwise.",
            "",
            restarts,
            "",
            "- *`pg_ctl restart` s*: the command's own duration (stop, start, until the server accepts "
            "connections); *server down s*: node1's `received fast shutdown request` line → its next `database "
            "system is ready to accept connections` line.",
            "- *write outage*: the longest gap between acknowledged commits from the last one before the restart "
            "command to the first one after `pg_ctl` returned (the client may still commit for the few "
            "milliseconds before the shutdown begins); *resumed after `pg_ctl` returned*: that first commit, "
            "after the command returned (node2's WAL receiver reconnecting and the client reconnecting).",
            "- *node2: grace line*, *WAL receiver woken*, *streams again*: node2's keeper lines `primary ... "
            "announced a clean shutdown; not counting failed heartbeats ...` and `... is back after its restart; "
            "starting this standby's WAL receiver at once`, and its server's `started streaming WAL` line, "
            "after the restart command; *pair steady again*: the command → the pair synchronous and steady "
            "again (polled every 100 ms).",
            "- *failovers*: restarts after which node2 had left recovery, logged `lost; promoting` or "
            "acknowledged a commit (must be none); *lost commits*: acknowledged ids missing on the primary "
            "once the client has stopped after the last restart (must be 0).",
            "",
        ]
    lines += [
        "## Overhead of the keeper (idle connected pair, extrapolated to one hour)",
        "",
        overhead,
        "",
        *(["CPU from /proc/PID/stat utime+stime (10 ms ticks) unless marked *scheduler* "
           "(/proc/PID/schedstat, ns). *Heartbeat backends*: the server backends that answer the peer "
           "keeper's heartbeat connection, both nodes together. RSS is VmRSS of the keeper process; it "
           "includes the shared memory pages it has touched, *private* is RssAnon. *WAL*: "
           "`pg_current_wal_lsn()` difference on the idle primary over the window (the keeper's pulse, a "
           "logical message and a flush every keepalive_time while the standby streams, and what the server "
           "logs itself, e.g. running-xacts records), per hour and per keepalive_time."
           + (" With a witness, the witness server's own CPU is not counted." if any_witness(settings) else ""),
           ""] if "overhead" in ran else []),
        "## pgbench (`pgbench -c 4 -j 2 -N`, primary of a synchronous pair, with vs without the extension)",
        "",
        pgb,
        "",
        "## Targets",
        "",
        *tg,
        "",
    ]
    if failed:
        lines += ["## Failed repetitions", ""]
        groups: dict[tuple, list] = {}
        for r in failed:
            groups.setdefault((r["experiment"], r["setting"], r.get("error", "")), []).append(str(r["rep"]))
        for (exp, setting, err), reps in groups.items():
            lines.append(f"- {exp} {setting} rep {', '.join(reps)}: {err}")
        lines.append("")
    notes = list(run_info.get("notes", [])) + observations(records, settings)
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    text = "\n".join(lines)
    with open(path, "w") as f:
        f.write(text)
    return "\n\n".join([t for t in (failover, witness, frozen, cut, restarts, overhead, pgb, "\n".join(tg))
                        if t and t != "Not run."])
