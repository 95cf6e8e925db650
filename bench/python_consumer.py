#!/usr/bin/env python3
"""Baseline: a Python consumer in the style of the system microbatch replaces.

Reads microbatches of BATCH_SIZE messages with ``consume(num_messages=...)``,
does no processing, and commits synchronously after every batch
(``commit(asynchronous=False)``), as the replaced system does after each
successful batch. It stops once it has seen ``--messages`` records (or after
``--timeout`` seconds without a record) and prints one JSON line with its own
timings on stdout:

  start        wall clock (s) when the script started (before the import)
  assigned     wall clock when the first partitions were assigned
  first        wall clock when the first record was returned
  last         wall clock when the last wanted record had been committed
  records      records consumed
  commits      synchronous commits made
  cpu_s        user + system CPU seconds of this process (getrusage)
  max_rss_kib  peak resident set size (getrusage ru_maxrss, KiB)

This is a baseline for comparison, not part of microbatch.
"""

import time

START = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402

from confluent_kafka import Consumer, KafkaException  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bootstrap-server", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092"))
    ap.add_argument("--topic", required=True)
    ap.add_argument("--group", required=True)
    ap.add_argument("--messages", type=int, required=True)
    ap.add_argument("--batch-size", type=int, default=int(os.environ.get("BATCH_SIZE", "500")))
    ap.add_argument("--timeout", type=float, default=30.0, help="give up after this many idle seconds")
    ap.add_argument("--avro-registry", help="decode each value with AvroDeserializer against this registry URL")
    args = ap.parse_args()

    decode = None
    if args.avro_registry:
        from confluent_kafka.schema_registry import SchemaRegistryClient
        from confluent_kafka.schema_registry.avro import AvroDeserializer
        from confluent_kafka.serialization import MessageField, SerializationContext

        deserializer = AvroDeserializer(SchemaRegistryClient({"url": args.avro_registry}))
        context = SerializationContext(args.topic, MessageField.VALUE)

        def decode(value):
            return deserializer(value, context)

    assigned = []

    def on_assign(consumer, partitions):
        if not assigned:
            assigned.append(time.time())

    consumer = Consumer(
        {
            "bootstrap.servers": args.bootstrap_server,
            "group.id": args.group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([args.topic], on_assign=on_assign)

    records = 0
    commits = 0
    first = None
    idle_since = time.time()
    while records < args.messages:
        msgs = consumer.consume(num_messages=args.batch_size, timeout=1.0)
        if not msgs:
            if time.time() - idle_since > args.timeout:
                print(f"python_consumer: no record for {args.timeout}s, stopping at {records}", file=sys.stderr)
                break
            continue
        idle_since = time.time()
        if first is None:
            first = idle_since
        good = 0
        for m in msgs:
            err = m.error()
            if err is not None:
                if err.fatal():
                    raise KafkaException(err)
                continue
            if decode is not None:
                decode(m.value())
            good += 1
        records += good
        if good:
            consumer.commit(asynchronous=False)
            commits += 1
    last = time.time()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    consumer.close()
    print(
        json.dumps(
            {
                "start": START,
                "assigned": assigned[0] if assigned else None,
                "first": first,
                "last": last,
                "records": records,
                "commits": commits,
                "cpu_s": usage.ru_utime + usage.ru_stime,
                "max_rss_kib": usage.ru_maxrss,
            }
        )
    )
    return 0 if records >= args.messages else 1


if __name__ == "__main__":
    sys.exit(main())
