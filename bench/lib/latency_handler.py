#!/usr/bin/env python3
"""An `exec` handler for bench/latency.sh (standard library only).

microbatch starts one of these per slot and writes one JSON line per batch
({"records": [{"partition", "offset", "value", "timestamp_ms", ...}]}) to its
stdin. For every record it notes the record's sequence number (the digits
`microbatch produce` puts at the start of the value) and
`now - timestamp_ms`, taken after the batch was parsed, just before the
answer `{"batch_id":…,"failed":[]}` goes back: the latency from the record's timestamp to
the handler's completion. Per batch it also notes how long json.loads took,
the part of that latency that is this Python handler's own.

Output: <dir>/lat-<pid>.txt, lines `seq latency_ms` and, per batch,
`# records parse_ms`.
"""

import json
import os
import sys
import time


def main() -> int:
    out_dir = sys.argv[1]
    path = os.path.join(out_dir, f"lat-{os.getpid()}.txt")
    now = time.time
    with open(path, "a") as out:
        for line in sys.stdin:
            t_read = now()
            batch = json.loads(line)
            t_parsed = now()
            done_ms = t_parsed * 1000.0
            rows = []
            for r in batch["records"]:
                ts = r.get("timestamp_ms")
                value = r.get("value") or ""
                seq = value.split(" ", 1)[0]
                if ts is not None and seq.isdigit():
                    rows.append(f"{seq} {done_ms - ts:.3f}\n")
            rows.append(f"# {len(batch['records'])} {(t_parsed - t_read) * 1000.0:.3f}\n")
            sys.stdout.write('{"batch_id":%s,"failed":[]}\n' % json.dumps(batch["batch_id"]))
            sys.stdout.flush()
            out.write("".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
