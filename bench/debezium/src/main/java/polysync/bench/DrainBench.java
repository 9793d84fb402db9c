package polysync.bench;

import io.debezium.embedded.Connect;
import io.debezium.engine.DebeziumEngine;
import io.debezium.engine.RecordChangeEvent;
import io.debezium.engine.format.ChangeEventFormat;
import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.nio.file.StandardCopyOption;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.Properties;
import java.util.TreeMap;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicBoolean;
import java.util.concurrent.atomic.AtomicLong;
import java.util.concurrent.atomic.AtomicReference;
import org.apache.kafka.connect.data.Field;
import org.apache.kafka.connect.data.Schema;
import org.apache.kafka.connect.data.Struct;
import org.apache.kafka.connect.source.SourceRecord;

/**
 * Drains an existing pgoutput slot with Debezium's embedded engine (no Kafka) and reports how
 * long the change events took, in Kafka Connect's in-memory form (no JSON/Avro serialization).
 *
 * <p>Consumers ({@code --consumer}): {@code noop} (default) only counts each event, so the figure
 * is Debezium's own decoding and conversion; {@code redis} also deletes, per event, the cache
 * keys its table's {@code --key TABLE=PREFIX{COLUMN}} templates name (polysync's
 * {@code invalidate} action), as pipelined DELs per Debezium batch, and marks the batch
 * processed only once Redis has answered every DEL.
 *
 * <p>End of the run: after {@code expected} change events (backlog mode), or with
 * {@code --until-table TABLE} at the first change event of TABLE (steady mode; that marker event
 * is not counted, and {@code expected}, which may then be 0, is a minimum). {@code --ready-file}
 * is created once the task has started and the slot is being streamed.
 *
 * <p>Arguments, positional or as flags (--host, --port, --db, --user, --password, --slot,
 * --publication, --expected, --timeout; optional --tables for table.include.list, and
 * --debezium.PROPERTY=VALUE to set any other engine or connector property):
 * host port db user password slot publication expected timeout_seconds. See {@link #USAGE}.
 *
 * <p>Prints one JSON line on success (see README.md), times measured from just before the engine
 * is started. Exit 1 on timeout, on a Redis error, or when the engine stops on its own; exit 2
 * on bad arguments.
 */
public final class DrainBench {
  private static final String[] NAMES = {
    "host", "port", "db", "user", "password", "slot", "publication", "expected", "timeout"
  };
  private static final List<String> OPTIONS =
      List.of("tables", "consumer", "redis", "key", "until-table", "ready-file");
  private static final String USAGE =
      "usage: DrainBench host port db user password slot publication expected timeout_seconds\n"
          + "         [--tables schema.t1,schema.t2] [--debezium.<property>=value ...]\n"
          + "         [--consumer noop|redis] [--redis HOST:PORT (127.0.0.1:56379)]\n"
          + "         [--key TABLE=PREFIX{COLUMN} ...] [--until-table TABLE] [--ready-file PATH]\n"
          + "  (each positional one also as --name value; expected may be 0 only with --until-table;\n"
          + "   --redis and --key only with --consumer redis)";

  public static void main(String[] argv) throws Exception {
    List<String> keySpecs = new ArrayList<>();
    Map<String, String> a = parse(argv, keySpecs);
    Properties p = new Properties();
    p.setProperty("name", "polysync-drain-bench");
    p.setProperty("connector.class", "io.debezium.connector.postgresql.PostgresConnector");
    p.setProperty("offset.storage", "org.apache.kafka.connect.storage.MemoryOffsetBackingStore");
    p.setProperty("offset.flush.interval.ms", "1000");
    p.setProperty("database.hostname", a.get("host"));
    p.setProperty("database.port", a.get("port"));
    p.setProperty("database.dbname", a.get("db"));
    p.setProperty("database.user", a.get("user"));
    p.setProperty("database.password", a.get("password"));
    p.setProperty("topic.prefix", "bench");
    p.setProperty("plugin.name", "pgoutput");
    p.setProperty("slot.name", a.get("slot"));
    p.setProperty("publication.name", a.get("publication"));
    p.setProperty("publication.autocreate.mode", "disabled");
    p.setProperty("snapshot.mode", "no_data"); // stream only, from the slot's position
    p.setProperty("slot.drop.on.stop", "false");
    p.setProperty("tombstones.on.delete", "false");
    for (Map.Entry<String, String> e : a.entrySet()) {
      if (e.getKey().startsWith("debezium.")) { // any other connector/engine property
        p.setProperty(e.getKey().substring("debezium.".length()), e.getValue());
      }
    }
    if (a.containsKey("tables")) {
      p.setProperty("table.include.list", a.get("tables"));
    }
    long expected = Long.parseLong(a.get("expected"));
    long timeout = Long.parseLong(a.get("timeout"));
    String consumer = a.getOrDefault("consumer", "noop");
    String untilTable = a.get("until-table");
    Path readyFile = a.containsKey("ready-file") ? Paths.get(a.get("ready-file")) : null;
    preflight(a);

    Invalidator inv = null;
    if (consumer.equals("redis")) {
      List<Invalidator.Template> templates = new ArrayList<>();
      for (String s : keySpecs) {
        templates.add(Invalidator.Template.parse(s)); // validated by parse()
      }
      String endpoint = a.getOrDefault("redis", "127.0.0.1:56379");
      try (Connection c = DriverManager.getConnection(url(a), a.get("user"), a.get("password"))) {
        inv = new Invalidator(endpoint, templates, c);
      } catch (SQLException e) {
        fatal("cannot read the replica identities from " + url(a) + ": " + e.getMessage());
      } catch (RuntimeException e) {
        fatal("redis " + endpoint + ": " + e);
      }
      if (templates.isEmpty()) {
        System.err.println("DrainBench: note: redis consumer without --key sends no DEL");
      }
    }
    if (readyFile != null) {
      try {
        Files.deleteIfExists(readyFile); // a stale one would start the harness too early
      } catch (IOException e) {
        fatal("cannot remove the old ready file " + readyFile + ": " + e);
      }
    }

    final Invalidator redis = inv;
    AtomicLong count = new AtomicLong();
    AtomicLong first = new AtomicLong();
    AtomicLong firstMs = new AtomicLong(-1);
    AtomicLong lastMs = new AtomicLong(-1);
    Map<String, Long> ops = new ConcurrentHashMap<>(); // by Debezium op: c, u, d (r: snapshot)
    AtomicReference<String> stopped = new AtomicReference<>();
    AtomicReference<String> failure = new AtomicReference<>();
    AtomicBoolean finished = new AtomicBoolean();
    CountDownLatch done = new CountDownLatch(1);
    long start = System.nanoTime();
    DebeziumEngine<RecordChangeEvent<SourceRecord>> engine =
        DebeziumEngine.create(ChangeEventFormat.of(Connect.class))
            .using(p)
            .using(
                (success, message, error) -> {
                  // Only reached before the end if the engine gave up (bad slot, lost
                  // connection, a Redis error thrown out of the handler...).
                  stopped.set(message + (error == null ? "" : " (" + error + ")"));
                  done.countDown();
                })
            .using(
                new DebeziumEngine.ConnectorCallback() {
                  @Override
                  public void taskStarted() {
                    if (readyFile != null) {
                      watchSlot(a, readyFile, start, failure, done);
                    }
                  }
                })
            .notifying(
                (records, committer) -> {
                  if (finished.get()) {
                    return; // the run is over and the process about to halt
                  }
                  int handled = 0;
                  boolean ends = false;
                  for (RecordChangeEvent<SourceRecord> r : records) {
                    handled++;
                    SourceRecord s = r.record();
                    if (isChange(s)) {
                      Struct v = (Struct) s.value();
                      String table = table(v);
                      if (untilTable != null && untilTable.equals(table)) {
                        ends = true; // the marker: not counted
                      } else {
                        long now = System.currentTimeMillis();
                        ops.merge(v.getString("op"), 1L, Long::sum);
                        long c = count.incrementAndGet();
                        if (c == 1) {
                          first.set(System.nanoTime());
                          firstMs.set(now);
                        }
                        lastMs.set(now);
                        if (redis != null) {
                          redis.add(schema(v), table, s);
                        }
                        ends = untilTable == null && c == expected;
                      }
                      if (ends && redis == null) {
                        finished.set(true);
                        done.countDown();
                      }
                    }
                    if (redis == null) {
                      committer.markProcessed(r);
                    }
                    if (ends) {
                      break; // later events are neither counted nor acknowledged
                    }
                  }
                  if (redis != null) {
                    try {
                      redis.flush(); // every DEL answered before anything is acknowledged
                    } catch (RuntimeException e) {
                      failure.compareAndSet(null, "redis " + redis.endpoint() + ": " + e);
                      done.countDown();
                      throw e;
                    }
                    for (int i = 0; i < handled; i++) {
                      committer.markProcessed(records.get(i));
                    }
                  }
                  committer.markBatchFinished();
                  if (ends && redis != null) {
                    finished.set(true);
                    done.countDown();
                  }
                })
            .build();
    ExecutorService executor = Executors.newSingleThreadExecutor();
    executor.execute(engine);
    boolean arrived = done.await(timeout, TimeUnit.SECONDS);
    double secs = (System.nanoTime() - start) / 1e9;
    double firstSecs = first.get() == 0 ? -1 : (first.get() - start) / 1e9;
    long n = count.get();
    System.err.println("DrainBench: change events by op: " + new TreeMap<>(ops));
    String why = null;
    if (failure.get() != null) {
      why = failure.get();
    } else if (!finished.get()) {
      why = arrived ? "engine stopped: " + stopped.get() : "timeout of " + timeout + " s";
    } else if (n < expected) {
      why = "the marker came first";
    }
    if (why != null) {
      String what =
          untilTable == null
              ? n + " of " + expected + " change events"
              : n + " change events (at least " + expected + " expected) and no change in " + untilTable;
      if (untilTable != null && finished.get()) {
        what = n + " change events before the change in " + untilTable + ", " + expected + " expected";
      }
      System.err.printf(Locale.ROOT, "DrainBench: FAILED: %s after %.1f s (%s)%n", what, secs, why);
      System.err.flush();
      Runtime.getRuntime().halt(1);
    }
    System.out.printf(
        Locale.ROOT,
        "{\"events\": %d, \"seconds\": %.3f, \"first_event_seconds\": %.3f, \"consumer\": \"%s\","
            + " \"redis_commands\": %d, \"keys_deleted_requested\": %d, \"keys_deleted\": %d,"
            + " \"unmapped\": %d, \"first_event_epoch_ms\": %d, \"last_event_epoch_ms\": %d}%n",
        n,
        secs,
        firstSecs,
        consumer,
        redis == null ? 0 : redis.commands,
        redis == null ? 0 : redis.keysRequested,
        redis == null ? 0 : redis.keysDeleted,
        redis == null ? 0 : redis.unmapped,
        firstMs.get(),
        lastMs.get());
    System.out.flush();
    // The engine's orderly shutdown can take seconds; the figure is already taken.
    Runtime.getRuntime().halt(0);
  }

  /**
   * Called when the engine reports the task started. The Postgres task's start() only launches
   * the coordinator thread, which later issues START_REPLICATION; so wait (in another thread)
   * until PostgreSQL shows the slot active, then create the ready file (atomically, containing
   * the epoch milliseconds).
   */
  private static void watchSlot(
      Map<String, String> a,
      Path readyFile,
      long start,
      AtomicReference<String> failure,
      CountDownLatch done) {
    double taskSecs = (System.nanoTime() - start) / 1e9;
    Thread t =
        new Thread(
            () -> {
              String url = url(a);
              try (Connection c = DriverManager.getConnection(url, a.get("user"), a.get("password"));
                  PreparedStatement q =
                      c.prepareStatement(
                          "SELECT active FROM pg_replication_slots WHERE slot_name = ? AND database = current_database()")) {
                q.setString(1, a.get("slot"));
                while (true) {
                  try (ResultSet r = q.executeQuery()) {
                    if (r.next() && r.getBoolean(1)) {
                      break;
                    }
                  }
                  Thread.sleep(20);
                }
                Path tmp = readyFile.resolveSibling(readyFile.getFileName() + ".tmp");
                Files.writeString(tmp, System.currentTimeMillis() + "\n");
                Files.move(
                    tmp,
                    readyFile,
                    StandardCopyOption.ATOMIC_MOVE,
                    StandardCopyOption.REPLACE_EXISTING);
                System.err.printf(
                    Locale.ROOT,
                    "DrainBench: task started at %.3f s, slot streaming at %.3f s; wrote %s%n",
                    taskSecs,
                    (System.nanoTime() - start) / 1e9,
                    readyFile);
              } catch (SQLException | IOException | RuntimeException e) {
                failure.compareAndSet(null, "ready file " + readyFile + ": " + e);
                done.countDown();
              } catch (InterruptedException e) {
                Thread.currentThread().interrupt();
              }
            },
            "drain-bench-ready");
    t.setDaemon(true);
    t.start();
  }

  private static String url(Map<String, String> a) {
    return "jdbc:postgresql://" + a.get("host") + ":" + a.get("port") + "/" + a.get("db");
  }

  /**
   * Debezium would create a missing slot (and start at the current WAL end) rather than fail, so
   * check first that the slot and the publication exist.
   */
  private static void preflight(Map<String, String> a) {
    String url = url(a);
    try (Connection c = DriverManager.getConnection(url, a.get("user"), a.get("password"));
        PreparedStatement slot =
            c.prepareStatement(
                "SELECT plugin, active FROM pg_replication_slots WHERE slot_name = ? AND database = current_database()");
        PreparedStatement pub = c.prepareStatement("SELECT 1 FROM pg_publication WHERE pubname = ?")) {
      slot.setString(1, a.get("slot"));
      try (ResultSet r = slot.executeQuery()) {
        if (!r.next() || !"pgoutput".equals(r.getString(1))) {
          fatal("no pgoutput slot '" + a.get("slot") + "' in database " + a.get("db"));
        }
        if (r.getBoolean(2)) {
          fatal("slot '" + a.get("slot") + "' is in use by another process");
        }
      }
      pub.setString(1, a.get("publication"));
      try (ResultSet r = pub.executeQuery()) {
        if (!r.next()) {
          fatal("no publication '" + a.get("publication") + "' in database " + a.get("db"));
        }
      }
    } catch (SQLException e) {
      fatal("cannot query " + url + ": " + e.getMessage());
    }
  }

  private static void fatal(String why) {
    System.err.println("DrainBench: FAILED: " + why);
    System.exit(1);
  }

  /** A row change: a Debezium envelope (c/u/d/r) with a value, not a tombstone or heartbeat. */
  private static boolean isChange(SourceRecord s) {
    Schema vs = s.valueSchema();
    return s.value() != null && vs != null && vs.name() != null && vs.name().endsWith(".Envelope");
  }

  /** The bare table name of a change envelope (source.table), or null. */
  private static String table(Struct envelope) {
    Field f = envelope.schema().field("source");
    Struct src = f == null ? null : envelope.getStruct("source");
    return src == null || src.schema().field("table") == null ? null : src.getString("table");
  }

  /** The schema of a change envelope (source.schema), or null. */
  private static String schema(Struct envelope) {
    Field f = envelope.schema().field("source");
    Struct src = f == null ? null : envelope.getStruct("source");
    return src == null || src.schema().field("schema") == null ? null : src.getString("schema");
  }

  private static Map<String, String> parse(String[] argv, List<String> keySpecs) {
    Map<String, String> m = new HashMap<>();
    List<String> pos = new ArrayList<>();
    for (int i = 0; i < argv.length; i++) {
      String s = argv[i];
      if (s.equals("-h") || s.equals("--help")) {
        System.out.println(USAGE);
        System.exit(0);
      } else if (s.startsWith("--")) {
        String name;
        String value = null;
        int eq = s.indexOf('=');
        if (eq > 0) {
          name = s.substring(2, eq);
          value = s.substring(eq + 1);
        } else if (i + 1 < argv.length) {
          name = s.substring(2);
          value = argv[++i];
        } else {
          name = null;
          fail("missing value for " + s);
        }
        if ("key".equals(name)) {
          keySpecs.add(value); // repeatable
        } else {
          m.put(name, value);
        }
      } else {
        pos.add(s);
      }
    }
    for (int i = 0, j = 0; i < NAMES.length && j < pos.size(); i++) {
      if (!m.containsKey(NAMES[i])) {
        m.put(NAMES[i], pos.get(j++));
      }
    }
    for (String k : m.keySet()) {
      if (!OPTIONS.contains(k) && !k.startsWith("debezium.") && !List.of(NAMES).contains(k)) {
        fail("unknown flag --" + k);
      }
    }
    for (String n : NAMES) {
      if (!m.containsKey(n)) {
        fail("missing " + n);
      }
    }
    try {
      long expected = Long.parseLong(m.get("expected"));
      if (expected < (m.containsKey("until-table") ? 0 : 1) || Long.parseLong(m.get("timeout")) < 1) {
        fail("expected must be at least 1 (0 allowed with --until-table), timeout at least 1");
      }
    } catch (NumberFormatException e) {
      fail("expected and timeout must be integers");
    }
    String consumer = m.getOrDefault("consumer", "noop");
    if (!consumer.equals("noop") && !consumer.equals("redis")) {
      fail("--consumer is noop or redis, not " + consumer);
    }
    if (!consumer.equals("redis") && (m.containsKey("redis") || !keySpecs.isEmpty())) {
      fail("--redis and --key need --consumer redis");
    }
    if (m.containsKey("redis")) {
      String r = m.get("redis");
      int colon = r.lastIndexOf(':');
      try {
        if (colon < 1 || Integer.parseInt(r.substring(colon + 1)) < 1) {
          fail("--redis is HOST:PORT, not " + r);
        }
      } catch (NumberFormatException e) {
        fail("--redis is HOST:PORT, not " + r);
      }
    }
    for (String k : keySpecs) {
      if (Invalidator.Template.parse(k) == null) {
        fail("--key is TABLE=PREFIX{COLUMN} (one or more {COLUMN}), not " + k);
      }
    }
    if (m.containsKey("until-table") && m.get("until-table").isEmpty()) {
      fail("--until-table needs a table name");
    }
    return m;
  }

  private static void fail(String why) {
    System.err.println("DrainBench: " + why + "\n" + USAGE);
    System.exit(2);
  }

  private DrainBench() {}
}
