// SharePeer: Kafka's own KafkaShareConsumer as a peer in a share group, for
// the interoperation test (crates/cli/tests/it/share.rs). It accepts every
// record explicitly, writes "partition offset deliveryCount" per record to
// its output file, and stops after the given idle time with no records.
//
// Run it with scripts/kafka-local.sh java-source scripts/kafka-local/SharePeer.java \
//   BOOTSTRAP GROUP TOPIC OUTPUT IDLE_MS
package local.microbatch;

import java.io.FileWriter;
import java.io.PrintWriter;
import java.time.Duration;
import java.util.List;
import java.util.Properties;

import org.apache.kafka.clients.consumer.AcknowledgeType;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.ConsumerRecords;
import org.apache.kafka.clients.consumer.KafkaShareConsumer;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;

public final class SharePeer {
    public static void main(String[] args) throws Exception {
        if (args.length != 5) {
            System.err.println("usage: SharePeer BOOTSTRAP GROUP TOPIC OUTPUT IDLE_MS");
            System.exit(2);
        }
        Properties props = new Properties();
        props.put("bootstrap.servers", args[0]);
        props.put("group.id", args[1]);
        props.put("share.acknowledgement.mode", "explicit");
        props.put("max.poll.records", "20");
        long idleMs = Long.parseLong(args[4]);
        try (KafkaShareConsumer<byte[], byte[]> consumer =
                        new KafkaShareConsumer<>(props, new ByteArrayDeserializer(), new ByteArrayDeserializer());
                PrintWriter out = new PrintWriter(new FileWriter(args[3]), true)) {
            consumer.subscribe(List.of(args[2]));
            long lastRecord = System.currentTimeMillis();
            while (System.currentTimeMillis() - lastRecord < idleMs) {
                ConsumerRecords<byte[], byte[]> records = consumer.poll(Duration.ofMillis(200));
                for (ConsumerRecord<byte[], byte[]> r : records) {
                    out.println(r.partition() + " " + r.offset() + " " + r.deliveryCount().orElse((short) 0));
                    consumer.acknowledge(r, AcknowledgeType.ACCEPT);
                    lastRecord = System.currentTimeMillis();
                }
                if (!records.isEmpty()) {
                    consumer.commitSync();
                    // Work that takes a while, as a handler's does.
                    Thread.sleep(50);
                }
            }
        }
    }
}
