//! TLS upstreams: an untrusted certificate is a 502 and the credential is never sent;
//! a configured private CA works.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_rustls::rustls;

use crate::support::{client, error_code, Till, SECRET};

struct TlsUpstream {
    addr: std::net::SocketAddr,
    ca_pem: String,
    handshakes_ok: Arc<AtomicUsize>,
    received: Arc<Mutex<Vec<u8>>>,
}

/// A TLS server for `127.0.0.1` with a certificate from a fresh test CA. It records
/// every byte received after a completed handshake and answers one fixed 200.
async fn tls_upstream() -> TlsUpstream {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Till Test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf_params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap();
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handshakes_ok = Arc::new(AtomicUsize::new(0));
    let received = Arc::new(Mutex::new(Vec::new()));
    let (ok, rx) = (handshakes_ok.clone(), received.clone());
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            let (ok, rx) = (ok.clone(), rx.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                ok.fetch_add(1, Ordering::SeqCst);
                let mut buf = vec![0u8; 65536];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                rx.lock().unwrap().extend_from_slice(&head);
                let _ = tls
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                    )
                    .await;
                let _ = tls.shutdown().await;
            });
        }
    });
    TlsUpstream {
        addr,
        ca_pem: ca_cert.pem(),
        handshakes_ok,
        received,
    }
}

#[tokio::test]
async fn untrusted_certificate_is_502_and_the_credential_is_never_sent() {
    let up = tls_upstream().await;
    let toml = format!(
        "[upstreams.up]\nbase_url = \"https://{}\"\ncredential_env = \"UP_SECRET\"\nauth = {{ header = \"authorization\", scheme = \"Bearer\" }}\n",
        up.addr
    );
    let till = Till::start(&toml).await;
    let key = till.mint_up(Some(3));
    let r = client()
        .get(format!("{}/up/v1/x", till.url))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(error_code(r).await, "upstream_unreachable");
    assert_eq!(up.handshakes_ok.load(Ordering::SeqCst), 0);
    assert!(
        up.received.lock().unwrap().is_empty(),
        "no request bytes may reach an untrusted server"
    );
}

#[tokio::test]
async fn a_configured_private_ca_is_trusted() {
    let up = tls_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &up.ca_pem).unwrap();
    let toml = format!(
        "[upstreams.up]\nbase_url = \"https://{}\"\ncredential_env = \"UP_SECRET\"\nauth = {{ header = \"authorization\", scheme = \"Bearer\" }}\nca_file = \"{}\"\n",
        up.addr,
        ca_file.display()
    );
    let till = Till::start(&toml).await;
    let key = till.mint_up(Some(3));
    let r = client()
        .get(format!("{}/up/v1/x", till.url))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "ok");
    let head = String::from_utf8_lossy(&up.received.lock().unwrap()).to_ascii_lowercase();
    assert!(
        head.contains(&format!(
            "authorization: bearer {}",
            SECRET.to_ascii_lowercase()
        )),
        "{head}"
    );
    assert!(!head.contains("till_"));
}
