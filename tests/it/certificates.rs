//! The server's certificates: loaded at bind, reloaded by a supervised task.

use mailmoat::server::ServerError;
use mailmoat::tls::generate;
use mailmoat::Server;

use crate::harness::{config, sink, TempDir, TestProxy};

#[tokio::test]
async fn a_certificate_that_fails_to_load_stops_the_start_naming_the_file() {
    let dir = TempDir::new("certs-start");
    let good = generate::self_signed(&["mx.example.org"]).unwrap();
    let (certificate, key) = good.write_in(dir.path(), "mx").unwrap();
    let garbage = dir.write(
        "garbage.key",
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    );
    let missing = dir.path().join("missing.crt");
    for (cert, key, named) in [
        (&missing, &key, &missing),
        (&certificate, &garbage, &garbage),
    ] {
        let mut config = config("", &[]);
        config.tls.certificate = Some(cert.clone());
        config.tls.key = Some(key.clone());
        let err = match Server::bind(config).await {
            Ok(_) => panic!("started with {}", named.display()),
            Err(e) => e,
        };
        assert!(matches!(err, ServerError::Tls(_)), "{err:?}");
        let text = err.to_string();
        assert!(text.contains(&named.display().to_string()), "{text}");
    }
}

#[tokio::test]
async fn a_configured_certificate_is_exposed_and_its_reload_task_supervised() {
    let dir = TempDir::new("certs-task");
    let cert = generate::self_signed(&["mx.example.org"]).unwrap();
    let (certificate, key) = cert.write_in(dir.path(), "mx").unwrap();
    let sink = sink().await;
    let mut config = config("", &[sink.addr()]);
    config.tls.certificate = Some(certificate);
    config.tls.key = Some(key);
    let proxy = TestProxy::start_with(config).await;
    assert_eq!(
        proxy.metric(r#"mailmoat_tls_certificate_expiry_timestamp_seconds{certificate="default"}"#),
        cert.not_after as f64
    );
    // Its first reload says it runs (and watches).
    proxy
        .wait_metric(
            r#"mailmoat_tls_certificate_reloads_total{result="ok"}"#,
            1.0,
        )
        .await;
    assert_eq!(
        proxy.metric(r#"mailmoat_task_up{task="certificate_reload"}"#),
        1.0
    );
}

#[tokio::test]
async fn without_a_certificate_no_reload_task_runs() {
    let sink = sink().await;
    let proxy = TestProxy::start(r#""#, &[sink.addr()]).await;
    proxy
        .wait_metric(r#"mailmoat_task_up{task="state_sweep"}"#, 1.0)
        .await;
    let metrics = proxy.metrics.render();
    assert!(
        !metrics.contains(r#"task="certificate_reload""#),
        "{metrics}"
    );
    assert!(
        !metrics.contains("mailmoat_tls_certificate_expiry"),
        "{metrics}"
    );
}
