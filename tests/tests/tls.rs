//! TLS on both listeners: REST over rustls, the agent service over tonic's
//! rustls with optional mutual TLS, and plaintext refused off loopback.
//! Certificates are made here with rcgen (no openssl needed).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use corral_agent::fake::FakeConfig;
use corral_agent::AgentTls;
use corral_api::server::{Server, ServerConfig};
use corral_tests::{InProcessAgent, TestServer, ADMIN_TOKEN};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls;

struct Pki {
    ca_pem: String,
    dir: tempfile::TempDir,
}

struct Leaf {
    cert: PathBuf,
    key: PathBuf,
    cert_pem: String,
    key_pem: String,
}

impl Pki {
    fn new() -> (Self, CertifiedIssuer<'static, KeyPair>) {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca =
            CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("a CA");
        let pki = Self {
            ca_pem: ca.pem(),
            dir: tempfile::tempdir().expect("dir"),
        };
        (pki, ca)
    }

    fn leaf(&self, ca: &CertifiedIssuer<'static, KeyPair>, name: &str) -> Leaf {
        let key = KeyPair::generate().expect("key");
        let cert = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("params")
            .signed_by(&key, ca)
            .expect("signed");
        let leaf = Leaf {
            cert: self.dir.path().join(format!("{name}.crt")),
            key: self.dir.path().join(format!("{name}.key")),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        };
        std::fs::write(&leaf.cert, &leaf.cert_pem).expect("write");
        std::fs::write(&leaf.key, &leaf.key_pem).expect("write");
        leaf
    }

    fn ca_path(&self) -> PathBuf {
        let path = self.dir.path().join("ca.crt");
        std::fs::write(&path, &self.ca_pem).expect("write");
        path
    }
}

fn fake() -> FakeConfig {
    FakeConfig {
        latency: Duration::ZERO,
        fail_rate: 0.0,
        images: vec!["busybox".into()],
    }
}

/// One HTTP/1.1 request over TLS that trusts only `ca_pem`; the raw reply.
async fn https_get(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    path: &str,
) -> std::io::Result<String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.expect("pem")).expect("root");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let server_name = ServerName::try_from("localhost").expect("name");
    let mut tls = connector.connect(server_name, tcp).await?;
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let mut reply = String::new();
    tls.read_to_string(&mut reply).await?;
    Ok(reply)
}

/// Dials and opens the agent stream (an RPC, so a client certificate the
/// server refuses is noticed even where the client's handshake looked
/// done, as in TLS 1.3).
async fn grpc_dial(url: String, tls: AgentTls) -> Result<(), String> {
    let endpoint = tonic::transport::Endpoint::from_shared(url)
        .map_err(|e| e.to_string())?
        .tls_config(tls.client_config())
        .map_err(|e| e.to_string())?;
    let channel = endpoint.connect().await.map_err(|e| format!("{e:?}"))?;
    let mut client = corral_proto::pb::agent_service_client::AgentServiceClient::new(channel);
    // No token: a server that lets us this far answers `unauthenticated`.
    match client
        .connect(tokio_stream::iter(
            Vec::<corral_proto::pb::AgentMessage>::new(),
        ))
        .await
    {
        Err(status) if status.code() == tonic::Code::Unauthenticated => Ok(()),
        Err(status) => Err(format!("{status:?}")),
        Ok(_) => Err("the stream opened without a token".into()),
    }
}

/// A host token straight from the store (the harness's REST client speaks
/// plain HTTP only).
async fn host_token(cp: &TestServer) -> (String, String) {
    let issued = cp
        .server
        .control_plane
        .store()
        .create_host_token("tls", None)
        .await
        .expect("a host token");
    (issued.record.host_id, issued.secret)
}

fn with_tls(cert: &Path, key: &Path, client_ca: Option<PathBuf>) -> impl FnOnce(&mut ServerConfig) {
    let (cert, key) = (cert.to_path_buf(), key.to_path_buf());
    move |c| {
        c.tls_cert = Some(cert);
        c.tls_key = Some(key);
        c.client_ca = client_ca;
    }
}

#[tokio::test]
async fn rest_and_the_agent_service_speak_tls() {
    let (pki, ca) = Pki::new();
    let server = pki.leaf(&ca, "server");
    let cp = TestServer::start_with(with_tls(&server.cert, &server.key, None)).await;
    assert!(cp.server.grpc_url().starts_with("https://"));

    let reply = https_get(cp.server.http_addr, &pki.ca_pem, "/v1/admin/hosts")
        .await
        .expect("an HTTPS answer");
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(
        reply.to_ascii_lowercase().contains("x-request-id"),
        "{reply}"
    );

    // Plain HTTP to the TLS port gets no HTTP answer.
    let mut tcp = tokio::net::TcpStream::connect(cp.server.http_addr)
        .await
        .expect("tcp");
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut plain = Vec::new();
    let _ = tcp.read_to_end(&mut plain).await;
    assert!(!String::from_utf8_lossy(&plain).contains("200 OK"));

    // A client that does not trust our CA is refused by its own check.
    let (other_pki, other_ca) = Pki::new();
    let _ = other_pki.leaf(&other_ca, "unused");
    assert!(
        https_get(cp.server.http_addr, &other_pki.ca_pem, "/healthz")
            .await
            .is_err()
    );
    let untrusting = AgentTls {
        ca_pem: Some(other_pki.ca_pem.clone().into_bytes()),
        identity: None,
    };
    assert!(grpc_dial(cp.server.grpc_url(), untrusting).await.is_err());

    // A real agent that trusts the CA registers over TLS.
    agent_registers_over_tls(
        &cp,
        AgentTls {
            ca_pem: Some(pki.ca_pem.clone().into_bytes()),
            identity: None,
        },
    )
    .await;
}

/// A real (in-process) agent dialling with `tls` registers and its host
/// becomes ready.
async fn agent_registers_over_tls(cp: &TestServer, tls: AgentTls) {
    let (host_id, token) = host_token(cp).await;
    let _agent = InProcessAgent::start_tls(
        &host_id,
        &cp.server.grpc_url(),
        &token,
        4000,
        4096,
        fake(),
        tls,
    );
    cp.wait_host_ready(&host_id).await;
}

#[tokio::test]
async fn with_a_client_ca_agents_must_present_a_certificate() {
    let (pki, ca) = Pki::new();
    let server = pki.leaf(&ca, "server");
    let agent_cert = pki.leaf(&ca, "agent");
    let cp = TestServer::start_with(with_tls(&server.cert, &server.key, Some(pki.ca_path()))).await;
    let trusting = AgentTls {
        ca_pem: Some(pki.ca_pem.clone().into_bytes()),
        identity: None,
    };

    // Without a client certificate, or with one from another CA, the
    // agent service refuses; REST (bearer keys) asks for none.
    assert!(grpc_dial(cp.server.grpc_url(), trusting.clone())
        .await
        .is_err());
    let (other_pki, other_ca) = Pki::new();
    let stranger = other_pki.leaf(&other_ca, "stranger");
    let mut with_stranger = trusting.clone();
    with_stranger.identity = Some((
        stranger.cert_pem.into_bytes(),
        stranger.key_pem.into_bytes(),
    ));
    assert!(grpc_dial(cp.server.grpc_url(), with_stranger)
        .await
        .is_err());
    let reply = https_get(cp.server.http_addr, &pki.ca_pem, "/healthz")
        .await
        .expect("REST needs no client certificate");
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");

    let mut with_cert = trusting;
    with_cert.identity = Some((
        agent_cert.cert_pem.clone().into_bytes(),
        agent_cert.key_pem.clone().into_bytes(),
    ));
    grpc_dial(cp.server.grpc_url(), with_cert.clone())
        .await
        .expect("a client certificate from the CA is accepted");
    agent_registers_over_tls(&cp, with_cert).await;
}

#[tokio::test]
async fn plaintext_is_refused_off_loopback_unless_allowed() {
    corral_tests::init_logging();
    let dir = tempfile::tempdir().expect("dir");
    let mut config = ServerConfig::local(dir.path().to_path_buf(), Some(ADMIN_TOKEN.into()));
    config.http_addr = "0.0.0.0:0".parse().expect("addr");
    let err = match Server::start(config.clone()).await {
        Ok(_) => panic!("plaintext on 0.0.0.0 must be refused"),
        Err(err) => format!("{err:#}"),
    };
    assert!(err.contains("refusing to serve plaintext"), "{err}");

    config.allow_plaintext = true;
    let server = Server::start(config).await.expect("allowed explicitly");
    server.shutdown().await;

    // Loopback stays plaintext without ceremony (as `corral dev` uses it).
    let config = ServerConfig::local(dir.path().join("loop"), Some(ADMIN_TOKEN.into()));
    let server = Server::start(config).await.expect("loopback plaintext");
    server.shutdown().await;
}

/// Runs the `corral` CLI with `args`; (success, stdout, stderr).
async fn corral_cli(args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(corral_tests::binary("corral"))
        .args(args)
        .env_remove("CORRAL_URL")
        .env_remove("CORRAL_API_KEY")
        .env_remove("CORRAL_ADMIN_TOKEN")
        .env_remove("CORRAL_CA_CERT")
        .env_remove("CORRAL_CLIENT_CERT")
        .env_remove("CORRAL_CLIENT_KEY")
        .output()
        .await
        .expect("run corral");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn the_cli_speaks_tls_with_a_custom_ca_and_a_client_certificate() {
    let (pki, ca) = Pki::new();
    let server = pki.leaf(&ca, "server");
    let client = pki.leaf(&ca, "cli");
    let cp = TestServer::start_with(with_tls(&server.cert, &server.key, None)).await;
    let url = format!("https://localhost:{}", cp.server.http_addr.port());
    let ca_path = pki.ca_path();
    let ca_arg = ca_path.to_string_lossy().into_owned();

    // Trusting our CA: the admin command answers over HTTPS.
    let (ok, stdout, stderr) = corral_cli(&[
        "--url",
        &url,
        "--admin-token",
        ADMIN_TOKEN,
        "--ca-cert",
        &ca_arg,
        "admin",
        "hosts",
    ])
    .await;
    assert!(ok, "stdout: {stdout}\nstderr: {stderr}");

    // With a client certificate too (REST does not ask for one; presenting
    // it must not break anything).
    let (ok, stdout, stderr) = corral_cli(&[
        "--url",
        &url,
        "--admin-token",
        ADMIN_TOKEN,
        "--ca-cert",
        &ca_arg,
        "--client-cert",
        &client.cert.to_string_lossy(),
        "--client-key",
        &client.key.to_string_lossy(),
        "admin",
        "hosts",
    ])
    .await;
    assert!(ok, "stdout: {stdout}\nstderr: {stderr}");

    // Not trusting it (another CA): refused by the CLI's own check.
    let (other_pki, _other_ca) = Pki::new();
    let other_ca = other_pki.ca_path();
    let (ok, _, stderr) = corral_cli(&[
        "--url",
        &url,
        "--admin-token",
        ADMIN_TOKEN,
        "--ca-cert",
        &other_ca.to_string_lossy(),
        "admin",
        "hosts",
    ])
    .await;
    assert!(!ok, "a server signed by an unknown CA must be refused");
    assert!(stderr.contains("cannot reach"), "{stderr}");

    // A file that is not a certificate is a clear error.
    let (ok, _, stderr) = corral_cli(&[
        "--url",
        &url,
        "--admin-token",
        ADMIN_TOKEN,
        "--ca-cert",
        &client.key.to_string_lossy(),
        "admin",
        "hosts",
    ])
    .await;
    assert!(!ok);
    assert!(stderr.contains("certificate"), "{stderr}");
}
