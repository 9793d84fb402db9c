package polysync.local;

import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.util.concurrent.CountDownLatch;

import org.codelibs.opensearch.runner.OpenSearchRunner;

/**
 * A single-node OpenSearch cluster for local tests: plain HTTP on 127.0.0.1:PORT (no security
 * plugin), data under BASE_DIR/node_1/data (kept across restarts). Runs until killed; SIGTERM
 * closes the node cleanly.
 *
 * Usage: LocalOpenSearch BASE_DIR HTTP_PORT TRANSPORT_PORT
 */
public final class LocalOpenSearch {
    public static void main(final String[] args) throws Exception {
        if (args.length != 3) {
            System.err.println("usage: LocalOpenSearch BASE_DIR HTTP_PORT TRANSPORT_PORT");
            System.exit(2);
        }
        final Path base = Paths.get(args[0]).toAbsolutePath();
        final int httpPort = Integer.parseInt(args[1]);
        final int transportPort = Integer.parseInt(args[2]);
        Files.createDirectories(base);

        final OpenSearchRunner runner = new OpenSearchRunner();
        final CountDownLatch closed = new CountDownLatch(1);
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            try {
                runner.close();
            } catch (final Exception e) {
                System.err.println("close failed: " + e);
            } finally {
                closed.countDown();
            }
        }, "local-opensearch-shutdown"));

        try {
            runner.onBuild((number, settings) -> {
                settings.put("network.host", "127.0.0.1");
                settings.put("http.port", httpPort);
                settings.put("transport.port", transportPort);
                settings.put("discovery.type", "single-node");
                settings.putList("node.roles", "cluster_manager", "data", "ingest");
                // Tests must not turn read-only because the disk of a dev machine is fairly full.
                settings.put("cluster.routing.allocation.disk.threshold_enabled", false);
                settings.put("action.auto_create_index", true);
            }).build(OpenSearchRunner.newConfigs()
                    .basePath(base.toString())
                    .numOfNode(1)
                    .clusterName("polysync-local"));
            runner.ensureYellow();
        } catch (final Throwable t) {
            t.printStackTrace();
            System.err.println("LocalOpenSearch: failed to start: " + t);
            Runtime.getRuntime().halt(1);
        }
        System.out.println("LocalOpenSearch: ready on http://127.0.0.1:" + httpPort);
        closed.await();
    }
}
