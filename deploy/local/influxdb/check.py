r"""Check of the local InfluxDB 1.x: line protocol and the HTTP API behave as polysync expects.

    python3 check.py [-v] [URL]      (default $POLYSYNC_TEST_INFLUX or http://127.0.0.1:58086)

Standard library only. In a scratch database (dropped at the end):
 - a point whose measurement, tag keys/values, field keys and string field contain spaces, commas,
   equals signs, double quotes and non-ASCII text, escaped per the line-protocol rules, reads back
   exactly through SELECT on /query;
 - a field written as integer, then as string in a later batch of three lines: HTTP 400 with
   {"error":"partial write: field type conflict: ... dropped=1"}, and the other two lines written.
With -v it prints the line, the query answers, the exact error response, and whether the v2
compatibility endpoint /api/v2/write exists (InfluxDB 1.6: no, 404; it came with 1.8).

Escaping rules as InfluxDB 1.6 applies them (checked here):
 - measurement: backslash before comma and space;
 - tag keys, tag values, field keys: backslash before comma, equals sign and space. A backslash
   is not an escape for itself there: `a\\b` is stored as `a\\b` and `x\\\,y` as `x\\,y`, so a
   backslash at the end of a value (400 "invalid tag format") or right before an escaped
   character cannot be written; neither can a newline;
 - string field values: in double quotes, backslash before `"` and `\`; a newline may stay raw.
"""
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request

args = [a for a in sys.argv[1:] if a != "-v"]
verbose = "-v" in sys.argv[1:]
URL = (args[0] if args else os.environ.get("POLYSYNC_TEST_INFLUX", "http://127.0.0.1:58086")).rstrip("/")
DB = f"polysync_peers_check_{os.getpid()}"


def say(*a):
    if verbose:
        print(*a, flush=True)


def check(cond, msg):
    if not cond:
        raise SystemExit(f"influxdb check FAILED: {msg}")


def http(method, path, params=None, body=None):
    url = URL + path + ("?" + urllib.parse.urlencode(params) if params else "")
    req = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode()


def query(q):
    status, _, body = http("POST", "/query", {"db": DB, "q": q, "epoch": "ns"})
    check(status == 200, f"{q}: HTTP {status} {body}")
    return json.loads(body)["results"][0]


def rows(measurement):
    series = query(f"SELECT * FROM {ident(measurement)}").get("series", [])
    return [dict(zip(s["columns"], v)) for s in series for v in s["values"]]


def esc_measurement(s):
    return s.replace(",", "\\,").replace(" ", "\\ ")


def esc_key(s):  # tag key, tag value, field key
    return s.replace(",", "\\,").replace("=", "\\=").replace(" ", "\\ ")


def esc_string(s):  # string field value
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def ident(s):  # InfluxQL double-quoted identifier
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


status, headers, _ = http("GET", "/ping")
check(status == 204, f"/ping: HTTP {status}")
say(f"/ping 204, X-Influxdb-Version: {headers.get('X-Influxdb-Version')}")
query(f"CREATE DATABASE {DB}")
try:
    # ---- escaping round trip
    meas = 'row s,"t"=ü'
    tags = {"ta g,k=1": 'v a,l=u"e ünï€😀', "host": "h1"}
    fields = {'f i,e=ld"': 'str "quoted", a,b=c back\\slash ünï€😀\nline2', "n": 42, "x": 1.5, "ok": True}

    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int):
            return f"{v}i"
        if isinstance(v, float):
            return repr(v)
        return esc_string(v)

    ts = 1700000000123456789
    line = (esc_measurement(meas) + "".join(f",{esc_key(k)}={esc_key(v)}" for k, v in sorted(tags.items()))
            + " " + ",".join(f"{esc_key(k)}={value(v)}" for k, v in fields.items()) + f" {ts}")
    say(f"line protocol: {line}")
    status, _, body = http("POST", "/write", {"db": DB, "precision": "ns"}, line.encode())
    check(status == 204, f"write: HTTP {status} {body}")
    got = rows(meas)
    say(f"SELECT *: {json.dumps(got, ensure_ascii=False)}")
    check(len(got) == 1, f"rows {got}")
    expected = {"time": ts, **tags, **fields}
    check(got[0] == expected, f"round trip differs:\n  wrote {expected}\n  read  {got[0]}")
    names = [v[0] for v in query("SHOW MEASUREMENTS")["series"][0]["values"]]
    check(names == [meas], f"SHOW MEASUREMENTS {names}")

    # ---- field type conflict in a later batch: partial write
    status, _, body = http("POST", "/write", {"db": DB, "precision": "s"}, b"conf,host=a v=1i 1700000000\n")
    check(status == 204, f"batch 1: HTTP {status} {body}")
    batch = b'conf,host=b v=2i 1700000001\nconf,host=c v="three" 1700000002\nconf,host=d v=4i 1700000003\n'
    status, headers, body = http("POST", "/write", {"db": DB, "precision": "s"}, batch)
    say(f"type conflict: HTTP {status}, X-Influxdb-Error: {headers.get('X-Influxdb-Error')}")
    say(f"type conflict body: {body!r}")
    err = json.loads(body).get("error", "")
    check(status == 400 and err.startswith("partial write: field type conflict") and err.endswith("dropped=1"),
          f"type conflict: HTTP {status} {body}")
    written = [(r["host"], r["v"]) for r in rows("conf")]
    say(f"after the conflict the measurement holds: {written}")
    check(written == [("a", 1), ("b", 2), ("d", 4)], f"partial write kept {written}")

    # ---- v2 compatibility endpoint (InfluxDB >= 1.8)
    status, _, body = http("POST", "/api/v2/write", {"bucket": f"{DB}/autogen", "precision": "s"}, b"v2 v=1i 1700000000")
    say(f"/api/v2/write: HTTP {status} {body.strip()!r}")
finally:
    http("POST", "/query", {"q": f"DROP DATABASE {DB}"})
print("influxdb check ok: escaping round trip, partial write on a field type conflict")
