//! Background tasks run supervised: each one is registered under its name,
//! shown up, and `/readyz` is ready only while all of them run.

use crate::harness::*;

#[tokio::test]
async fn every_background_task_is_supervised_and_readyz_is_ok_while_all_run() {
    let sink = sink().await;
    let proxy = TestProxy::start("", &[sink.addr()]).await;
    let admin = proxy.admin.unwrap();
    let (status, metrics) = http_get(admin, "/metrics").await;
    assert_eq!(status, 200);
    for task in [
        "smtp_accept",
        "admin",
        "blocklist_files",
        "ban_maintenance",
        "state_sweep",
        "upstream_check",
    ] {
        let up = format!(r#"mailmoat_task_up{{task="{task}"}}"#);
        let restarts = format!(r#"mailmoat_task_restarts_total{{task="{task}"}}"#);
        assert_eq!(series_value(&metrics, &up), Some(1.0), "{up} in\n{metrics}");
        assert_eq!(
            series_value(&metrics, &restarts),
            Some(0.0),
            "{restarts} in\n{metrics}"
        );
    }
    // Configured only with an API.
    assert_eq!(
        series_value(&metrics, r#"mailmoat_task_up{task="blocklist_api"}"#),
        None
    );
    let (status, body) = http_get(admin, "/readyz").await;
    assert_eq!((status, body.as_str()), (200, "ready\n"));
}
