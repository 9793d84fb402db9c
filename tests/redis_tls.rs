//! TLS to Redis (ElastiCache in-transit encryption): `rediss://` with certificate checking on
//! by default. The test generates its own CA and server certificate with `openssl` at test time
//! (nothing committed) and runs its own TLS-only `redis-server` on a free loopback port.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::support::daemon::{InProcess, pg_cache_config};
use crate::support::pg::TestDb;
use crate::support::{Workspace, free_port, shared, unique, wait_for};

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl (make peers installs it)");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A CA (`<name>.crt`/`.key`) and, when `server`, a certificate for DNS name `localhost` only
/// (`server.crt`/`.key`) signed by it.
fn make_ca(dir: &Path, name: &str) -> PathBuf {
    let (key, crt) = (format!("{name}.key"), format!("{name}.crt"));
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN=polysync test {name}"),
            "-keyout",
            &key,
            "-out",
            &crt,
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    dir.join(crt)
}

fn make_server_cert(dir: &Path, ca: &str) {
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
    );
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n").unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
            "-out",
            "server.crt",
        ],
    );
}

/// A TLS-only redis-server, stopped on drop.
struct TlsRedis {
    child: Child,
    port: u16,
    ca: PathBuf,
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl TlsRedis {
    async fn start(dir: &Path) -> TlsRedis {
        let ca = make_ca(dir, "ca");
        make_server_cert(dir, "ca");
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--tls-cert-file", "server.crt", "--tls-key-file", "server.key", "--tls-ca-cert-file", "ca.crt"])
            .args(["--tls-auth-clients", "no", "--save", "", "--appendonly", "no", "--dir"])
            .arg(dir)
            .current_dir(dir)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server");
        let r = TlsRedis { child, port, ca };
        wait_for("the TLS redis-server", Duration::from_secs(20), || async {
            r.cli(&["PING"]).as_deref() == Some("PONG")
        })
        .await;
        r
    }

    /// One command through `redis-cli` over TLS, verifying the server against the test CA.
    fn cli(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("redis-cli")
            .args(["--tls", "--cacert"])
            .arg(&self.ca)
            .args(["-h", "localhost", "-p", &self.port.to_string()])
            .args(args)
            .output()
            .ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

fn workspace(db: &TestDb, slot: &str, p: &str, sink: &str) -> Workspace {
    let ws = Workspace::new();
    let cfg = pg_cache_config(&db.url, slot, "");
    let start = cfg.find("[sinks.cache]").unwrap();
    ws.write_config(&format!("{}{sink}", &cfg[..start]));
    ws.write_pipeline(
        "t",
        &format!(
            "source = \"db\"\n[match]\nrelations = [\"public.t\"]\n[[sink]]\ntarget = \"cache\"\naction = \"invalidate\"\nkeys = [\"{p}:{{{{ key.id }}}}\"]\n"
        ),
    );
    ws
}

async fn refusal(ws: &Workspace) -> String {
    crate::support::daemon::refusal(&ws.config_path()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_verifies_the_server_by_default_and_refuses_wrong_identities() {
    let _g = shared().await;
    let dir = tempfile::tempdir().unwrap();
    let redis = TlsRedis::start(dir.path()).await;
    let other_ca = make_ca(dir.path(), "other");
    let db = TestDb::create("redistls").await;
    db.exec("CREATE TABLE t (id bigint PRIMARY KEY)").await;
    let p = unique("rtls");
    let slot = unique("s");
    let port = redis.port;
    let ca = redis.ca.display().to_string();

    // rediss:// with the CA and the name on the certificate: invalidations arrive over TLS.
    let ws = workspace(
        &db,
        &slot,
        &p,
        &format!("[sinks.cache]\nkind = \"cache\"\nurl = \"rediss://localhost:{port}\"\ntls_ca_file = \"{ca}\"\n"),
    );
    let d = InProcess::start(&ws.config_path());
    redis.cli(&["SET", &format!("{p}:1"), "x"]).unwrap();
    wait_for("the slot", Duration::from_secs(60), || async { db.confirmed(&slot).await > 0 }).await;
    db.exec("INSERT INTO t VALUES (1)").await;
    db.wait_caught_up(&slot, Duration::from_secs(60)).await;
    assert_eq!(redis.cli(&["EXISTS", &format!("{p}:1")]).as_deref(), Some("0"), "the key was invalidated over TLS");
    d.stop().await.unwrap();

    // Certificate checking is on by default: a CA that did not sign the server is refused.
    let ws = workspace(
        &db,
        &slot,
        &p,
        &format!(
            "[sinks.cache]\nkind = \"cache\"\nurl = \"rediss://localhost:{port}\"\ntls_ca_file = \"{}\"\n",
            other_ca.display()
        ),
    );
    let err = refusal(&ws).await;
    assert!(err.contains("sink cache") && err.to_lowercase().contains("certificate"), "{err}");
    // The right CA but an address the certificate does not name: refused (verify-full).
    let ws = workspace(
        &db,
        &slot,
        &p,
        &format!("[sinks.cache]\nkind = \"cache\"\nurl = \"rediss://127.0.0.1:{port}\"\ntls_ca_file = \"{ca}\"\n"),
    );
    let err = refusal(&ws).await;
    assert!(err.contains("sink cache") && err.to_lowercase().contains("certificate"), "{err}");
    // verify-ca checks the chain, not the name: accepted.
    let ws = workspace(
        &db,
        &slot,
        &p,
        &format!(
            "[sinks.cache]\nkind = \"cache\"\nurl = \"rediss://127.0.0.1:{port}\"\ntls = \"verify-ca\"\ntls_ca_file = \"{ca}\"\n"
        ),
    );
    let d = InProcess::start(&ws.config_path());
    redis.cli(&["SET", &format!("{p}:2"), "x"]).unwrap();
    db.exec("INSERT INTO t VALUES (2)").await;
    db.wait_caught_up(&slot, Duration::from_secs(60)).await;
    assert_eq!(redis.cli(&["EXISTS", &format!("{p}:2")]).as_deref(), Some("0"));
    d.stop().await.unwrap();
    // Plaintext to a TLS-only port never "works": the daemon does not report the sink ready.
    let ws = workspace(
        &db,
        &slot,
        &p,
        &format!("[sinks.cache]\nkind = \"cache\"\nurl = \"redis://localhost:{port}\"\ntimeout = \"1s\"\n"),
    );
    let d = InProcess::start(&ws.config_path());
    tokio::time::sleep(Duration::from_secs(3)).await;
    redis.cli(&["SET", &format!("{p}:3"), "x"]).unwrap();
    db.exec("INSERT INTO t VALUES (3)").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(redis.cli(&["EXISTS", &format!("{p}:3")]).as_deref(), Some("1"), "nothing applied over plaintext");
    assert!(db.confirmed(&slot).await < db.current_lsn().await, "nothing confirmed that was not applied");
    d.stop().await.unwrap();
    db.cleanup().await;
}
