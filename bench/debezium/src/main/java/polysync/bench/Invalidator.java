package polysync.bench;

import java.sql.Connection;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.HashMap;
import java.util.HashSet;
import java.util.List;
import java.util.Map;
import java.util.Set;
import org.apache.kafka.connect.data.Field;
import org.apache.kafka.connect.data.Struct;
import org.apache.kafka.connect.source.SourceRecord;
import redis.clients.jedis.DefaultJedisClientConfig;
import redis.clients.jedis.Jedis;
import redis.clients.jedis.Pipeline;
import redis.clients.jedis.RedisProtocol;
import redis.clients.jedis.Response;

/**
 * The redis consumer: for each change event, the cache keys its table's templates name (the
 * equivalent of polysync's {@code invalidate} action), deleted with DEL commands pipelined per
 * Debezium batch. Used from the engine's single handler thread only.
 */
final class Invalidator implements AutoCloseable {
  /** Keys per DEL command at most. */
  static final int KEYS_PER_DEL = 512;

  /** One {@code --key TABLE=TEMPLATE}: literal text and {COLUMN} placeholders. */
  static final class Template {
    final String table;
    final String text;
    // Alternating: parts[0] literal, parts[1] column, parts[2] literal, ... (odd: columns).
    final List<String> parts = new ArrayList<>();

    Template(String table, String text) {
      this.table = table;
      this.text = text;
    }

    /** Parses TABLE=PREFIX{COLUMN}[SUFFIX...]; null when malformed. */
    static Template parse(String spec) {
      int eq = spec.indexOf('=');
      if (eq < 1 || eq == spec.length() - 1) {
        return null;
      }
      Template t = new Template(spec.substring(0, eq), spec.substring(eq + 1));
      String s = t.text;
      int i = 0;
      while (true) {
        int open = s.indexOf('{', i);
        if (open < 0) {
          t.parts.add(s.substring(i));
          break;
        }
        int close = s.indexOf('}', open);
        if (close < 0 || close == open + 1) {
          return null;
        }
        t.parts.add(s.substring(i, open));
        t.parts.add(s.substring(open + 1, close));
        i = close + 1;
      }
      return t.parts.size() < 3 ? null : t; // at least one column
    }

    /**
     * The key for this row, or null when a column value is missing (or null). A column is read
     * from {@code row} when {@code readable} (null: all) names it, else from the record key.
     */
    String render(Struct row, Set<String> readable, Struct key) {
      StringBuilder b = new StringBuilder(text.length() + 16);
      for (int i = 0; i < parts.size(); i++) {
        if (i % 2 == 0) {
          b.append(parts.get(i));
        } else {
          String col = parts.get(i);
          Object v = readable == null || readable.contains(col) ? column(row, col) : null;
          if (v == null) {
            v = column(key, col);
          }
          if (v == null) {
            return null;
          }
          b.append(v);
        }
      }
      return b.toString();
    }

    private static Object column(Struct s, String name) {
      if (s == null) {
        return null;
      }
      Field f = s.schema().field(name);
      return f == null ? null : s.get(f);
    }
  }

  private final Map<String, List<Template>> byTable = new HashMap<>();
  // schema.table -> the columns a delete's old tuple really carries (null: all, REPLICA IDENTITY
  // FULL). Debezium fills the columns pgoutput did not send with null, or with 0/"" when the
  // column is NOT NULL, so before's own content cannot tell.
  private final Map<String, Set<String>> oldTuple = new HashMap<>();
  private final Jedis jedis;
  private final Pipeline pipeline;
  private final String endpoint;
  private final List<String> pending = new ArrayList<>();
  private final List<Response<Long>> replies = new ArrayList<>();
  long commands; // DEL commands sent
  long keysRequested; // keys passed to DEL
  long keysDeleted; // sum of DEL replies: keys that existed
  long unmapped; // keys a template could not derive (column absent from after/before and key)

  Invalidator(String endpoint, List<Template> templates, Connection pg) throws SQLException {
    for (Template t : templates) {
      byTable.computeIfAbsent(t.table, k -> new ArrayList<>()).add(t);
    }
    loadReplicaIdentities(pg);
    this.endpoint = endpoint;
    int colon = endpoint.lastIndexOf(':');
    String host = endpoint.substring(0, colon);
    int port = Integer.parseInt(endpoint.substring(colon + 1));
    jedis =
        new Jedis(
            host,
            port,
            DefaultJedisClientConfig.builder()
                .connectionTimeoutMillis(5_000)
                .socketTimeoutMillis(60_000)
                .clientName("polysync-drain-bench")
                .protocol(RedisProtocol.RESP2) // plain DEL replies; no RESP3 negotiation
                .build());
    // Fail before the engine starts when Redis is not there (throws JedisException).
    String pong = jedis.ping();
    if (!"PONG".equals(pong)) {
      throw new IllegalStateException("PING answered " + pong);
    }
    pipeline = jedis.pipelined();
  }

  /**
   * For every table named by a template (in any schema): which columns a delete carries in its
   * old tuple: all with REPLICA IDENTITY FULL, the primary key's with DEFAULT, the index's with
   * USING INDEX, none with NOTHING.
   */
  private void loadReplicaIdentities(Connection pg) throws SQLException {
    String sql =
        "SELECT n.nspname, c.relname, c.relreplident,"
            + " coalesce((SELECT array_agg(a.attname::text) FROM pg_index i"
            + "   JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)"
            + "   WHERE i.indrelid = c.oid AND ((c.relreplident = 'd' AND i.indisprimary)"
            + "     OR (c.relreplident = 'i' AND i.indisreplident))), '{}')"
            + " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            + " WHERE c.relkind IN ('r', 'p') AND c.relname = ANY(?)";
    try (PreparedStatement q = pg.prepareStatement(sql)) {
      q.setArray(1, pg.createArrayOf("text", byTable.keySet().toArray()));
      try (ResultSet r = q.executeQuery()) {
        while (r.next()) {
          String name = r.getString(1) + "." + r.getString(2);
          if ("f".equals(r.getString(3))) {
            oldTuple.put(name, null);
          } else {
            oldTuple.put(name, new HashSet<>(Arrays.asList((String[]) r.getArray(4).getArray())));
          }
        }
      }
    }
  }

  String endpoint() {
    return endpoint;
  }

  /** Queues the keys of one change event (its record's value is a Debezium envelope). */
  void add(String schema, String table, SourceRecord r) {
    List<Template> ts = byTable.get(table);
    if (ts == null) {
      return; // unmapped table: counted by the caller, no DEL
    }
    Struct v = (Struct) r.value();
    Struct row = v.getStruct("after");
    Set<String> readable = null;
    if (row == null) { // delete: before, of which only the old tuple's columns are real
      row = v.getStruct("before");
      String name = schema + "." + table;
      readable = oldTuple.containsKey(name) ? oldTuple.get(name) : Set.of();
    }
    Struct key = r.key() instanceof Struct ? (Struct) r.key() : null;
    for (Template t : ts) {
      String k = t.render(row, readable, key);
      if (k == null) {
        unmapped++;
      } else {
        pending.add(k);
      }
    }
  }

  /**
   * Sends the queued keys as pipelined DEL commands of at most {@link #KEYS_PER_DEL} keys and
   * waits for every reply. Throws on any Redis error (connection or error reply).
   */
  void flush() {
    if (pending.isEmpty()) {
      return;
    }
    for (int i = 0; i < pending.size(); i += KEYS_PER_DEL) {
      List<String> chunk = pending.subList(i, Math.min(pending.size(), i + KEYS_PER_DEL));
      replies.add(pipeline.del(chunk.toArray(new String[0])));
      commands++;
      keysRequested += chunk.size();
    }
    pending.clear();
    pipeline.sync(); // reads every reply; error replies are thrown by Response.get
    try {
      for (Response<Long> r : replies) {
        keysDeleted += r.get();
      }
    } finally {
      replies.clear();
    }
  }

  @Override
  public void close() {
    jedis.close();
  }
}
