"""The data report: what was read, kept, dropped and why (with examples), written to report.json and
summed up in the log."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from ft.kernel.formats import Drop

log = logging.getLogger("ft.data")


EXAMPLES_PER_REASON = 20  # kept in report.json; the log shows the first few


def build_report(drops: list[Drop], rows_read: int, notes: list[Drop] = (), truncated: int = 0) -> dict[str, Any]:
    """Counts per reason with the first examples (``where``, ``detail``) of each: rows dropped, and notes
    about rows kept (``Note``s of the formats, e.g. control-token text typed in a message). ``truncated``
    counts the samples cut to sequence_len and kept (``excess_length: truncate``); one that truncation
    left unusable (nothing to train, chosen equal to rejected) is counted as a drop only."""

    def by_reason(items: Sequence[Drop]) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for d in items:
            entry = out.setdefault(d.reason, {"count": 0, "examples": []})
            entry["count"] += 1
            if len(entry["examples"]) < EXAMPLES_PER_REASON:
                entry["examples"].append({"where": d.where, "detail": d.detail})
        return out

    return {"rows_read": rows_read, "dropped_total": len(drops), "dropped": by_reason(drops), "truncated": truncated,
            "noted_total": len(notes), "noted": by_reason(notes)}


def examples(drops: list[Drop], n: int) -> str:
    lines = [f"  {d.where}: {d.detail}" if d.detail else f"  {d.where}" for d in drops[:n]]
    if len(drops) > n:
        lines.append(f"  ... and {len(drops) - n} more")
    return "\n".join(lines)


def report_text(report: dict[str, Any], per_reason: int = 3) -> str:
    lines = []
    for reason, entry in sorted(report["dropped"].items(), key=lambda kv: -kv[1]["count"]):
        lines.append(f"  dropped {entry['count']} ({reason})")
        for ex in entry["examples"][:per_reason]:
            lines.append(f"    {ex['where']}: {ex['detail']}" if ex["detail"] else f"    {ex['where']}")
        if entry["count"] > per_reason:
            lines.append(f"    ... {entry['count'] - per_reason} more in report.json")
    return "\n".join(lines) if lines else "  dropped nothing"


def strict_message(report: dict[str, Any]) -> str:
    return (f"strict: true and {report['dropped_total']} row(s) were dropped:\n"
            + report_text(report, per_reason=10)
            + "\nFix the rows above, or set strict: false to train without them.")


def one_line(stats: dict[str, Any]) -> str:
    text = f"{stats.get('samples')} samples, {stats.get('tokens')} tokens"
    if stats.get("packed"):
        text += f", {stats.get('bins')} packed bins at {100 * stats.get('packing_efficiency', 0):.2f}% efficiency"
    return text


def log_report(report: dict[str, Any], stats: dict[str, Any], path: str) -> None:
    msg = [
        f"prepared data written to {path} in {stats['seconds']:.1f}s",
        f"  rows read {stats['rows']}, samples kept {stats['samples']} (+{stats['eval_samples']} eval), "
        f"tokens {stats['tokens']}, trained tokens {stats['trained_tokens']}",
        report_text(report),
    ]
    if stats.get("truncated"):
        msg.append(f"  truncated {stats['truncated']} sample(s) to sequence_len={stats['sequence_len']} and kept them "
                   "(excess_length: truncate; samples truncation left unusable are counted among the drops)")
    for part in stats.get("mixing") or []:
        msg.append(f"  {part['path']}: weight {part['weight']:g} -> {part['rows']} of the training rows "
                   f"({100 * part['share']:.1f}%; {part['available']} available, {part['repeats']:.2f}x)")
    if stats.get("packed"):
        msg.append(f"  packed into {stats['bins']} bins of {stats.get('bin_tokens', stats['sequence_len'])} tokens: "
                   f"efficiency {100 * stats['packing_efficiency']:.2f}%")
    log.info("\n".join(msg))
    log_notes(report)


def log_drops(report: dict[str, Any]) -> None:
    if report.get("dropped_total"):
        log.info("rows dropped when this cache was built:\n%s", report_text(report))
    if report.get("truncated"):
        log.info("samples truncated to sequence_len and kept when this cache was built: %d", report["truncated"])
    log_notes(report)


def log_notes(report: dict[str, Any]) -> None:
    for reason, entry in sorted((report.get("noted") or {}).items()):
        examples = "\n".join(f"    {ex['where']}: {ex['detail']}" for ex in entry["examples"][:3])
        more = f"\n    ... {entry['count'] - 3} more in report.json" if entry["count"] > 3 else ""
        log.warning("%d row(s) kept with a note: %s\n%s%s", entry["count"], reason, examples, more)
