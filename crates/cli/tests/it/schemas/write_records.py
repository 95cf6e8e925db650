"""Writes a test topic's records with confluent-kafka's own serializers
(AvroSerializer, ProtobufSerializer, JSONSerializer) against a schema
registry, then a few records no decoder can read.

Usage: write_records.py BOOTSTRAP REGISTRY_URL TOPIC SCENARIO
SCENARIO: avro | avro-v2 FROM TO | avro-v3 FROM TO | protobuf | json-schema
Prints nothing; the test holds the expected JSON. The scenario read-avro N
instead reads N records with AvroDeserializer and prints each value's `id`,
one per line (to check what `microbatch produce` writes).
"""
import datetime
import decimal
import struct
import sys
import uuid

from confluent_kafka import Producer
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.serialization import MessageField, SerializationContext

bootstrap, registry_url, topic, scenario = sys.argv[1:5]
registry = SchemaRegistryClient({"url": registry_url})
producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
subject = f"{topic}-value"


def send(value, headers=None, key=None):
    producer.produce(topic, value=value, key=key, headers=headers)
    producer.flush(30)


def ctx():
    return SerializationContext(topic, MessageField.VALUE)


ORDER_V1 = """{"type":"record","name":"Order","namespace":"shop","fields":[
 {"name":"id","type":"long"},
 {"name":"customer","type":"string"},
 {"name":"price","type":{"type":"bytes","logicalType":"decimal","precision":9,"scale":2}},
 {"name":"placed_at","type":{"type":"long","logicalType":"timestamp-millis"}},
 {"name":"day","type":{"type":"int","logicalType":"date"}},
 {"name":"ref","type":{"type":"string","logicalType":"uuid"}},
 {"name":"status","type":{"type":"enum","name":"Status","symbols":["NEW","PAID"]}},
 {"name":"note","type":["null","string"],"default":null}
]}"""
# Compatible: a field with a default (and another in v3).
ORDER_V2 = ORDER_V1.replace(
    '{"name":"note"', '{"name":"channel","type":"string","default":"web"},\n {"name":"note"'
)
ORDER_V3 = ORDER_V2.replace(
    '{"name":"note"', '{"name":"region","type":"string","default":"eu"},\n {"name":"note"'
)


ORDER_KEY = """{"type":"record","name":"OrderKey","namespace":"shop","fields":[
 {"name":"customer","type":"string"}]}"""


def avro_order(i, **extra):
    order = {
        "id": i,
        "customer": f"c{i}",
        "price": decimal.Decimal(f"{i}.5{i}"),
        "placed_at": datetime.datetime(2024, 5, 1, 12, 0, i, 123000, tzinfo=datetime.timezone.utc),
        "day": datetime.date(2024, 5, 1),
        "ref": uuid.UUID(f"00000000-0000-4000-8000-{i:012d}"),
        "status": "PAID" if i % 2 else "NEW",
        "note": None if i % 2 else f"note {i}",
    }
    order.update(extra)
    return order


def undecodable(schema_id):
    send(b"plain text, no wire format")
    send(b"\x00\x7f\xff\xff\xf0" + b"\x02")  # a schema id nobody registered
    send(b"\x00" + struct.pack(">I", schema_id) + b"\xff\xff\xff\xff\xff\xff")


if scenario in ("avro", "avro-v2", "avro-v3"):
    from confluent_kafka.schema_registry.avro import AvroSerializer

    if scenario == "avro":
        v1 = AvroSerializer(registry, ORDER_V1)
        # Keys too, with a schema of their own (subject <topic>-key).
        keys = AvroSerializer(registry, ORDER_KEY)
        key_ctx = SerializationContext(topic, MessageField.KEY)
        for i in range(1, 4):
            send(v1(avro_order(i), ctx()), key=keys({"customer": f"c{i}"}, key_ctx))
        v1_id = registry.get_latest_version(subject).schema_id
        undecodable(v1_id)
        # The schema id in a header, the payload without the prefix.
        framed = v1(avro_order(4), ctx())
        send(framed[5:], headers=[("__value_schema_id", framed[:5])])
        v2 = AvroSerializer(registry, ORDER_V2)
        for i in range(5, 7):
            send(v2(avro_order(i, channel="app"), ctx()))
    else:
        # avro-v2 FROM TO: records FROM..TO with version 2; avro-v3 with 3.
        writer = AvroSerializer(registry, ORDER_V2 if scenario == "avro-v2" else ORDER_V3)
        for i in range(int(sys.argv[5]), int(sys.argv[6])):
            send(writer(avro_order(i % 10, id=i, channel="app"), ctx()))
elif scenario == "protobuf":
    from google.protobuf import descriptor_pb2, descriptor_pool, timestamp_pb2
    from google.protobuf import message_factory
    from confluent_kafka.schema_registry.protobuf import ProtobufSerializer

    file = descriptor_pb2.FileDescriptorProto(
        name="shop/order.proto", package="shop", syntax="proto3",
        dependency=["google/protobuf/timestamp.proto"],
    )
    order = file.message_type.add(name="Order")
    F = descriptor_pb2.FieldDescriptorProto
    order.field.add(name="order_id", number=1, type=F.TYPE_INT64, label=F.LABEL_OPTIONAL)
    order.field.add(name="customer", number=2, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    order.field.add(name="placed_at", number=3, type=F.TYPE_MESSAGE, label=F.LABEL_OPTIONAL,
                    type_name=".google.protobuf.Timestamp")
    order.field.add(name="status", number=4, type=F.TYPE_ENUM, label=F.LABEL_OPTIONAL,
                    type_name=".shop.Order.Status")
    order.field.add(name="lines", number=5, type=F.TYPE_MESSAGE, label=F.LABEL_REPEATED,
                    type_name=".shop.Order.Line")
    line = order.nested_type.add(name="Line")
    line.field.add(name="sku", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    line.field.add(name="qty", number=2, type=F.TYPE_INT32, label=F.LABEL_OPTIONAL)
    status = order.enum_type.add(name="Status")
    status.value.add(name="NEW", number=0)
    status.value.add(name="PAID", number=1)
    refund = file.message_type.add(name="Refund")
    refund.field.add(name="reason", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    pool = descriptor_pool.Default()
    pool.AddSerializedFile(file.SerializeToString())
    Order = message_factory.GetMessageClass(pool.FindMessageTypeByName("shop.Order"))
    Refund = message_factory.GetMessageClass(pool.FindMessageTypeByName("shop.Refund"))
    conf = {"use.deprecated.format": False}
    orders = ProtobufSerializer(Order, registry, conf)
    refunds = ProtobufSerializer(Refund, registry, conf)
    for i in range(1, 3):
        send(orders(Order(
            order_id=10_000_000_000 + i, customer=f"c{i}",
            placed_at=timestamp_pb2.Timestamp(seconds=1714564800 + i, nanos=500000000),
            status=i % 2, lines=[Order.Line(sku=f"s{i}", qty=i)],
        ), ctx()))
    send(refunds(Refund(reason="late"), ctx()))
    undecodable(registry.get_latest_version(subject).schema_id)
elif scenario == "json-schema":
    from confluent_kafka.schema_registry.json_schema import JSONSerializer

    schema = """{"$schema":"http://json-schema.org/draft-07/schema#","title":"Person",
      "type":"object","properties":{"id":{"type":"integer"},"name":{"type":"string"}},
      "required":["id","name"]}"""
    people = JSONSerializer(schema, registry)
    for i in range(1, 3):
        send(people({"id": i, "name": f"p{i}"}, ctx()))
    schema_id = registry.get_latest_version(subject).schema_id
    send(b"plain text, no wire format")
    send(b"\x00\x7f\xff\xff\xf0" + b"{}")
    send(b"\x00" + struct.pack(">I", schema_id) + b'{"id":"not a number","name":"x"}')
elif scenario == "read-avro":
    from confluent_kafka import Consumer
    from confluent_kafka.schema_registry.avro import AvroDeserializer

    reader = AvroDeserializer(registry)
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{topic}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([topic])
    wanted, seen, idle = int(sys.argv[5]), 0, 0
    while seen < wanted and idle < 30:
        m = consumer.poll(1.0)
        if m is None or m.error():
            idle += 1
            continue
        print(reader(m.value(), ctx())["id"])
        seen += 1
    consumer.close()
else:
    sys.exit(f"unknown scenario {scenario}")
