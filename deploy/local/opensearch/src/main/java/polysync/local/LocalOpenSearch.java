package polysync.local;

import java.io.FileDescriptor;
import java.io.FileOutputStream;
import java.io.PrintStream;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.util.concurrent.CountDownLatch;

import org.codelibs.opensearch.runner.OpenSearchRunner;

/**
 * One OpenSearch node for local tests (deploy/local/opensearch.sh): plain HTTP on
 * 127.0.0.1:HTTP_PORT (no security plugin), transport on 127.0.0.1:TRANSPORT_PORT, a one-node
 * cluster CLUSTER_NAME. Data under BASE_DIR/node_1/data, kept across restarts (the runner only
 * deletes its directory on clean(), never called here). Runs until killed: SIGTERM (or SIGINT)
 * closes the node cleanly, then the JVM exits.
 *
 * Usage: LocalOpenSearch BASE_DIR HTTP_PORT TRANSPORT_PORT CLUSTER_NAME
 */
public final class LocalOpenSearch {
    public static void main(final String[] args) throws Exception {
        if (args.length != 4) {
            System.err.println("usage: LocalOpenSearch BASE_DIR HTTP_PORT TRANSPORT_PORT CLUSTER_NAME");
            System.exit(2);
        }
        final Path base = Paths.get(args[0]).toAbsolutePath();
        final int httpPort = Integer.parseInt(args[1]);
        final int transportPort = Integer.parseInt(args[2]);
        final String clusterName = args[3];
        Files.createDirectories(base);
        // OpenSearch routes System.out/err through log4j, which stops during JVM shutdown: write
        // the shutdown lines straight to the log file (stdout of the process).
        final PrintStream out = new PrintStream(new FileOutputStream(FileDescriptor.out), true);

        final OpenSearchRunner runner = new OpenSearchRunner();
        runner.setMaxHttpPort(-1);   // no probing for a free port: http.port below, or fail to bind
        final CountDownLatch closed = new CountDownLatch(1);
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            try {
                out.println("LocalOpenSearch: closing the node");
                runner.close();
                out.println("LocalOpenSearch: node closed");
            } catch (final Exception e) {
                out.println("LocalOpenSearch: close failed: " + e);
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
                // Tests must not hit the read-only flood stage on a fairly full dev disk.
                settings.put("cluster.routing.allocation.disk.threshold_enabled", false);
                settings.put("action.auto_create_index", true);
            }).build(OpenSearchRunner.newConfigs()
                    .basePath(base.toString())
                    .numOfNode(1)
                    .baseHttpPort(httpPort - 1)   // node 1's default = base + 1 (the banner)
                    .clusterName(clusterName));
            runner.ensureYellow();
        } catch (final Throwable t) {
            t.printStackTrace();
            System.err.println("LocalOpenSearch: failed to start: " + t);
            Runtime.getRuntime().halt(1);
        }
        System.out.println("LocalOpenSearch: ready on http://127.0.0.1:" + httpPort + " (cluster " + clusterName + ")");
        closed.await();
    }
}
