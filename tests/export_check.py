"""Checks a `tickvault export` against `tickvault wal dump` of the same log, field by field,
with readers independent of tickvault: pyarrow for Parquet, Python's csv and json.

usage: export_check.py DUMP EXPORT_DIR FORMAT [--prefix] [--kind K] [--symbol S] [--from MS] [--to MS]

DUMP holds the `wal dump` lines of every lane. Without --prefix the export must hold
exactly the dump's events that pass the filters; with --prefix (an export taken while a
daemon appended, the dump after it) it must hold, for each lane, the events of a prefix
of the lane (from its first record on, none skipped) and nothing else.
Prints a line of figures; exits 1 naming the first difference.
"""

import argparse
import calendar
import csv
import json
import os
import re
import sys

INDICATORS = ["sma20", "ema20", "rsi14", "macd", "macd_signal", "macd_hist", "bb_upper", "bb_middle", "bb_lower", "atr14"]
COLUMNS = {
    "quote": ["lane", "seq", "feed", "symbol", "ts", "uid", "bid", "ask", "bid_size", "ask_size", "exchange", "captured_at"],
    "trade": ["lane", "seq", "feed", "symbol", "ts", "uid", "price", "size", "exchange", "trade_id", "conditions", "captured_at"],
    "bar": ["lane", "seq", "feed", "symbol", "timeframe", "start", "open", "high", "low", "close", "volume", "vwap", "trades", "captured_at"],
    "derived": ["lane", "seq", "feed", "symbol", "timeframe", "start", "open", "high", "low", "close", "volume", "version"]
    + INDICATORS
    + ["captured_at"],
}
MILLIS = {"ts", "start"}
NANOS = {"captured_at"}
TEXT = {"lane", "feed", "symbol", "timeframe", "trade_id"}
INTS = {"seq", "uid", "exchange", "trades", "version"}
UNITS = {"second": "s", "minute": "m", "hour": "h", "day": "d"}


def fail(message):
    print("export_check: " + message, file=sys.stderr)
    sys.exit(1)


def expected_row(line):
    """The export row a dump line should give: (kind, dict), or None for a non-event."""
    event = line.get("event")
    if event is None:
        return None
    (kind, body), = event["body"].items()
    capture = event["capture"]
    derived = body if kind == "derived" else None
    if derived:
        body = derived["bar"]
    row = {"lane": line["lane"], "seq": line["seq"], "feed": capture["feed"], "symbol": body["symbol"]}
    if derived:
        tf = body["timeframe"]
        row["timeframe"] = "%d%s" % (tf["multiplier"], UNITS[tf["unit"]])
        row["start"] = body["start_ms"]
        for f in ["open", "high", "low", "close", "volume"]:
            row[f] = body.get(f)
        row["version"] = derived["version"]
        for f in INDICATORS:
            row[f] = derived["indicators"].get(f)
    elif kind == "bar":
        tf = body["timeframe"]
        row["timeframe"] = "%d%s" % (tf["multiplier"], UNITS[tf["unit"]])
        row["start"] = body["start_ms"]
        for f in ["open", "high", "low", "close", "volume", "vwap", "trades"]:
            row[f] = body.get(f)
    else:
        row["ts"] = body["ts_ms"]
        for f in COLUMNS[kind][5:-1]:
            row[f] = body.get(f)
        if kind == "trade":
            row["conditions"] = body.get("conditions") or []
    row["captured_at"] = capture["captured_at_ns"]
    return kind, row


RFC3339 = re.compile(r"^(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?Z$")


def instant(text, unit_ns):
    """An RFC 3339 UTC instant as an integer count of `unit_ns` nanoseconds."""
    m = RFC3339.match(text)
    if not m:
        fail("not an RFC 3339 UTC instant: %r" % text)
    y, mo, d, h, mi, s = (int(g) for g in m.groups()[:6])
    ns = calendar.timegm((y, mo, d, h, mi, s)) * 10**9 + int((m.group(7) or "").ljust(9, "0"))
    if ns % unit_ns:
        fail("%r is not a whole number of %d ns" % (text, unit_ns))
    return ns // unit_ns


def from_text(column, value):
    """A CSV or JSONL value (CSV: all text, "" for null) as the dump's value."""
    if value is None or value == "" and column not in TEXT | {"conditions"}:
        return None
    if column in MILLIS:
        return instant(value, 10**6)
    if column in NANOS:
        return instant(value, 1)
    if column == "conditions":
        if isinstance(value, list):
            return value
        return [int(x) for x in value.split(";")] if value else []
    if column in TEXT:
        return value
    if column in INTS:
        return int(value)
    return float(value)


def read_parquet(path, kind):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if table.column_names != COLUMNS[kind]:
        fail("%s: columns %s, expected %s" % (path, table.column_names, COLUMNS[kind]))
    types = {
        "seq": pa.int64(), "uid": pa.uint64(), "trades": pa.uint64(), "exchange": pa.int32(), "version": pa.uint64(),
        "ts": pa.timestamp("ms", tz="UTC"), "start": pa.timestamp("ms", tz="UTC"),
        "captured_at": pa.timestamp("ns", tz="UTC"), "conditions": pa.list_(pa.int32()),
    }
    columns = {}
    for name in table.column_names:
        column = table.column(name)
        want = types.get(name, pa.string() if name in TEXT else pa.float64())
        got = column.type
        if name == "conditions":
            got = pa.list_(got.value_type)  # the list's field name is not compared
        if got != want:
            fail("%s: column %s is %s, expected %s" % (path, name, column.type, want))
        if name in MILLIS | NANOS:
            column = column.cast(pa.int64())
        columns[name] = column.to_pylist()
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


def read_text(path, kind, fmt):
    rows = []
    with open(path, newline="") as f:
        if fmt == "csv":
            reader = csv.reader(f)
            header = next(reader)
            if header != COLUMNS[kind]:
                fail("%s: header %s, expected %s" % (path, header, COLUMNS[kind]))
            records = (dict(zip(header, r)) for r in reader)
        else:
            records = []
            for line in f:
                obj = json.loads(line)
                if list(obj) != COLUMNS[kind]:
                    fail("%s: keys %s, expected %s" % (path, list(obj), COLUMNS[kind]))
                records.append(obj)
        for r in records:
            rows.append({c: from_text(c, r[c]) for c in COLUMNS[kind]})
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("dump")
    p.add_argument("export_dir")
    p.add_argument("format", choices=["parquet", "csv", "jsonl"])
    p.add_argument("--prefix", action="store_true")
    p.add_argument("--kind")
    p.add_argument("--symbol")
    p.add_argument("--from", dest="from_ms", type=int)
    p.add_argument("--to", dest="to_ms", type=int)
    a = p.parse_args()

    expected = {k: {} for k in COLUMNS}
    lane_seqs = {}
    with open(a.dump) as f:
        for text in f:
            line = json.loads(text)
            lane_seqs.setdefault(line["lane"], []).append(line["seq"])
            got = expected_row(line)
            if got is None:
                continue
            kind, row = got
            ts = row.get("ts", row.get("start"))
            if a.kind and kind != a.kind or a.symbol and row["symbol"] != a.symbol:
                continue
            if a.from_ms is not None and ts < a.from_ms or a.to_ms is not None and ts >= a.to_ms:
                continue
            expected[kind][(row["lane"], row["seq"])] = row

    exported = {}
    files = 0
    for kind in COLUMNS:
        path = os.path.join(a.export_dir, "%s.%s" % (kind, a.format))
        if not os.path.exists(path):
            continue
        files += 1
        rows = read_parquet(path, kind) if a.format == "parquet" else read_text(path, kind, a.format)
        for row in rows:
            key = (row["lane"], row["seq"])
            if key in exported:
                fail("%s: %s %d exported twice" % (path, *key))
            exported[key] = (kind, row)

    want = {key: (kind, row) for kind in expected for key, row in expected[kind].items()}
    if a.prefix:
        # Each lane's exported records must be its first N records, for some N.
        for lane, seqs in lane_seqs.items():
            got = sorted(s for (l, s) in exported if l == lane)
            if got != seqs[: len(got)]:
                fail("lane %s: the export is not a prefix of the lane (%d records)" % (lane, len(got)))
        want = {key: v for key, v in want.items() if key in exported}
        if not exported:
            fail("the export is empty")
    for key, (kind, row) in want.items():
        if key not in exported:
            fail("%s %d (%s) is not in the export" % (key[0], key[1], kind))
        got_kind, got = exported[key]
        if got_kind != kind:
            fail("%s %d: exported as a %s, is a %s" % (key[0], key[1], got_kind, kind))
        for column in COLUMNS[kind]:
            if got[column] != row[column]:
                fail("%s %d %s: exported %r, the log holds %r" % (key[0], key[1], column, got[column], row[column]))
    extra = set(exported) - set(want)
    if extra:
        fail("%d exported rows are not in the log's range, e.g. %s %d" % (len(extra), *sorted(extra)[0]))
    print("export_check: %s: %d rows in %d files match the log field by field" % (a.format, len(want), files))


main()
