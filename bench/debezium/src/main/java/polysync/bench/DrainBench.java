package polysync.bench;

import io.debezium.engine.DebeziumEngine;
import io.debezium.engine.RecordChangeEvent;
import io.debezium.engine.format.ChangeEventFormat;
import io.debezium.embedded.Connect;
import java.util.Properties;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicLong;
import org.apache.kafka.connect.source.SourceRecord;

/**
 * Drains an existing pgoutput slot with Debezium's embedded engine and reports how long the
 * first N data change events took. The consumer does nothing with an event but count it (the
 * cheapest consumer Debezium allows), so the figure is Debezium's own decoding and conversion.
 *
 * <p>Arguments: host port db user password slot publication expectedEvents timeoutSeconds.
 * Prints one JSON line: {"events": N, "seconds": S, "first_event_seconds": F}.
 */
public final class DrainBench {
  public static void main(String[] a) throws Exception {
    if (a.length < 9) {
      System.err.println("usage: host port db user password slot publication expected timeout_seconds");
      System.exit(2);
    }
    Properties p = new Properties();
    p.setProperty("name", "polysync-drain-bench");
    p.setProperty("connector.class", "io.debezium.connector.postgresql.PostgresConnector");
    p.setProperty("offset.storage", "org.apache.kafka.connect.storage.MemoryOffsetBackingStore");
    p.setProperty("offset.flush.interval.ms", "1000");
    p.setProperty("database.hostname", a[0]);
    p.setProperty("database.port", a[1]);
    p.setProperty("database.dbname", a[2]);
    p.setProperty("database.user", a[3]);
    p.setProperty("database.password", a[4]);
    p.setProperty("topic.prefix", "bench");
    p.setProperty("plugin.name", "pgoutput");
    p.setProperty("slot.name", a[5]);
    p.setProperty("publication.name", a[6]);
    p.setProperty("publication.autocreate.mode", "disabled");
    p.setProperty("snapshot.mode", "no_data");
    p.setProperty("slot.drop.on.stop", "false");
    p.setProperty("tombstones.on.delete", "false");
    long expected = Long.parseLong(a[7]);
    long timeout = Long.parseLong(a[8]);

    AtomicLong count = new AtomicLong();
    AtomicLong first = new AtomicLong();
    CountDownLatch done = new CountDownLatch(1);
    long start = System.nanoTime();
    DebeziumEngine<RecordChangeEvent<SourceRecord>> engine =
        DebeziumEngine.create(ChangeEventFormat.of(Connect.class))
            .using(p)
            .notifying(
                (records, committer) -> {
                  for (RecordChangeEvent<SourceRecord> r : records) {
                    SourceRecord s = r.record();
                    if (s.value() != null && s.topic().startsWith("bench.")) {
                      long c = count.incrementAndGet();
                      if (c == 1) {
                        first.set(System.nanoTime());
                      }
                      if (c == expected) {
                        done.countDown();
                      }
                    }
                    committer.markProcessed(r);
                  }
                  committer.markBatchFinished();
                })
            .build();
    ExecutorService executor = Executors.newSingleThreadExecutor();
    executor.execute(engine);
    boolean ok = done.await(timeout, TimeUnit.SECONDS);
    double secs = (System.nanoTime() - start) / 1e9;
    double firstSecs = first.get() == 0 ? -1 : (first.get() - start) / 1e9;
    if (!ok) {
      System.err.printf("only %d of %d events within %d s%n", count.get(), expected, timeout);
      Runtime.getRuntime().halt(1);
    }
    System.out.printf("{\"events\": %d, \"seconds\": %.3f, \"first_event_seconds\": %.3f}%n", expected, secs, firstSecs);
    System.out.flush();
    // The engine's own shutdown can take a while; the figure is already taken.
    Runtime.getRuntime().halt(0);
  }

  private DrainBench() {}
}
