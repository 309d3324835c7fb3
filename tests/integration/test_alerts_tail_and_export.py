"""``streamproc alerts tail`` and ``alerts export`` on the real broker: the tail resumes where its consumer group
left off (``--from-start`` replays), ``--min-risk`` and ``--tier`` mean "at least", and the export writes one file
of a period's alerts, each once."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from typing import Any

from tests.conftest import ROOT, produce, worker_env

DAY = 86_400_000
JAN_1 = 1_767_225_600_000  # 2026-01-01


def record(cid: str, day: int, risk: str, tier: str = "medium", kind: str = "alert",
           clears: int = 0) -> tuple[str, bytes, bytes]:
    alert_id = f"{cid}:{clears if kind == 'cleared' else day}"
    value: dict[str, Any] = {"record": kind, "alert_id": alert_id, "customer_id": cid, "ts": JAN_1 + day * DAY}
    if kind == "alert":
        value.update(risk_level=risk, value_tier=tier, probability=0.9, action="call", reasons=[],
                     recommended_items=[])
    else:
        value.update(cleared_by="purchase", days=3)
    return ("churn-alerts", cid.encode(), json.dumps(value).encode())


def cli(settings: Any, *args: str) -> list[str]:
    proc = subprocess.run([sys.executable, "-m", "streamproc.cli", "alerts", *args], env=worker_env(settings),
                          cwd=ROOT, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    return proc.stdout.decode().splitlines()


def ids(lines: list[str]) -> list[str]:
    return sorted(f"{json.loads(line)['record']}:{json.loads(line)['alert_id']}" for line in lines)


def test_the_tail_resumes_where_its_group_left_off_and_filters_at_least(topics, tmp_path):
    settings = topics
    produce(settings, [record("a", 1, "medium"), record("b", 1, "high"), record("c", 1, "critical"),
                       record("d", 1, "critical", "low"), record("b", 4, "", kind="cleared", clears=1),
                       record("a", 4, "", kind="cleared", clears=1)])
    tail = ("tail", "--min-risk", "high", "--tier", "medium", "--json", "--timeout", "4", "--group", "team")
    first = cli(settings, *tail)
    # critical is "at least high"; d is below the medium tier; a's clearing follows an alert not shown
    assert ids(first) == ["alert:b:1", "alert:c:1", "cleared:b:1"]
    produce(settings, [record("e", 2, "critical", "high"), record("f", 2, "medium")])
    assert ids(cli(settings, *tail)) == ["alert:e:2"]  # resumed: only what came since
    assert ids(cli(settings, *tail)) == []
    replayed = cli(settings, *tail, "--from-start")
    assert ids(replayed) == ["alert:b:1", "alert:c:1", "alert:e:2", "cleared:b:1"]
    # another group starts from the beginning; the readable line names risk, customer and action
    readable = cli(settings, "tail", "--timeout", "4", "--group", "someone-else", "--max", "2")
    assert len(readable) == 2 and readable[0].startswith("[") and "→ call" in readable[0]

    out = tmp_path / "alerts.csv"
    produce(settings, [record("c", 1, "critical")])  # re-sent: at least once
    cli(settings, "export", "--since", "2026-01-02", "--until", "2026-01-03", "--format", "csv", "--out", str(out))
    rows = list(csv.DictReader(out.open()))
    assert [r["alert_id"] for r in rows] == ["a:1", "b:1", "c:1", "d:1"]
    assert {r["date"] for r in rows} == {"2026-01-02"} and rows[2]["risk_level"] == "critical"
    jsonl = tmp_path / "alerts.jsonl"
    cli(settings, "export", "--since", "2026-01-01", "--until", "2026-02-01", "--format", "jsonl", "--out", str(jsonl))
    assert len(jsonl.read_text().splitlines()) == 6  # a..f, once each, no cleared records
