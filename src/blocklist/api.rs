//! The central blocklist API: pulled on an interval with ETag, a bearer
//! token read from a file, jittered exponential backoff, and a cache on disk
//! that is loaded before the first fetch, so a restart during an API outage
//! still blocks everything that was blocked. Parsing an answer, building
//! its set and writing the cache (fsync) run off the runtime.

use std::io::{BufReader, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::sources::{Applied, Sources};
use super::{parse_reader, Source};
use crate::config::ApiSettings;

/// Largest body accepted (a million entries is about 20 MB).
const MAX_BODY: u64 = 64 * 1024 * 1024;

pub fn source() -> Source {
    Source {
        name: "api".into(),
        allow: false,
    }
}

/// Applies the cached list, if any.
pub fn load_cache(sources: &Sources, api: &ApiSettings) {
    let read = std::fs::File::open(&api.cache)
        .and_then(|file| parse_reader(BufReader::new(file), sources.limits()));
    match read {
        Ok(parsed) => {
            sources.apply(&source(), parsed.nets, &parsed.bad);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => sources.error(
            &source(),
            &format!("cannot read cache {}: {e}", api.cache.display()),
        ),
    }
}

/// Applies a fetched body and, if applied, caches it. Heavy (parse, build,
/// fsync): call it off the runtime.
fn apply_body(sources: &Sources, api: &ApiSettings, text: &str) -> bool {
    let parsed = match parse_reader(text.as_bytes(), sources.limits()) {
        Ok(parsed) => parsed,
        Err(e) => {
            sources.error(&source(), &format!("GET {}: body {e}", api.url));
            return false;
        }
    };
    if parsed.blank {
        // An overloaded API answering 200 with nothing must not unblock
        // everyone; an intentionally empty list says so with a comment line.
        sources.error(&source(), "empty body; keeping the cached list");
        return false;
    }
    if sources.apply(&source(), parsed.nets, &parsed.bad) == Applied::Kept {
        return false;
    }
    if let Err(e) = persist(&api.cache, text) {
        sources.error(
            &source(),
            &format!("cannot write cache {}: {e}", api.cache.display()),
        );
    }
    true
}

enum Fetched {
    NotModified,
    Body { text: String, etag: Option<String> },
}

/// Fetches forever; run it as a task and drop it to stop.
pub async fn poll(sources: Arc<Sources>, api: ApiSettings) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(api.timeout))
        .http_status_as_error(false)
        .build()
        .into();
    let mut etag: Option<String> = None;
    let mut failures: u32 = 0;
    loop {
        let (agent, api_, tag) = (agent.clone(), api.clone(), etag.clone());
        let fetched = tokio::task::spawn_blocking(move || fetch(&agent, &api_, tag))
            .await
            .unwrap_or_else(|e| Err(format!("fetch task failed: {e}")));
        let ok = match fetched {
            Ok(Fetched::NotModified) => {
                sources.success(&source());
                true
            }
            Ok(Fetched::Body {
                text,
                etag: new_tag,
            }) => {
                let (sources, api) = (sources.clone(), api.clone());
                let applied =
                    tokio::task::spawn_blocking(move || apply_body(&sources, &api, &text))
                        .await
                        .unwrap_or(false);
                if applied {
                    etag = new_tag;
                }
                applied
            }
            Err(e) => {
                sources.error(&source(), &e);
                false
            }
        };
        failures = if ok { 0 } else { failures.saturating_add(1) };
        tokio::time::sleep(next_wait(api.interval, failures)).await;
    }
}

fn fetch(agent: &ureq::Agent, api: &ApiSettings, etag: Option<String>) -> Result<Fetched, String> {
    let mut request = agent.get(&api.url);
    if let Some(path) = &api.token_file {
        let token = std::fs::read_to_string(path).map_err(|e| {
            format!(
                "cannot read blocklist.api.token_file {}: {e}",
                path.display()
            )
        })?;
        request = request.header("Authorization", &format!("Bearer {}", token.trim()));
    }
    if let Some(tag) = &etag {
        request = request.header("If-None-Match", tag);
    }
    // The error text names the URL but never the token.
    let mut response = request
        .call()
        .map_err(|e| format!("GET {}: {e}", api.url))?;
    match response.status().as_u16() {
        304 => Ok(Fetched::NotModified),
        200 => {
            let etag = response
                .headers()
                .get("etag")
                .and_then(|v| v.to_str().ok())
                .map(String::from);
            let text = response
                .body_mut()
                .with_config()
                .limit(MAX_BODY)
                .read_to_string()
                .map_err(|e| format!("GET {}: reading body: {e}", api.url))?;
            Ok(Fetched::Body { text, etag })
        }
        status => Err(format!("GET {}: HTTP {status}", api.url)),
    }
}

/// `interval` when healthy; after failures, doubling up to 16× with ±25 %
/// jitter so a fleet does not retry in step against a struggling API.
fn next_wait(interval: Duration, failures: u32) -> Duration {
    if failures == 0 {
        return interval;
    }
    let backoff = interval.saturating_mul(1 << failures.min(4));
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let jitter = 0.75 + f64::from(nanos % 1000) / 2000.0;
    backoff.mul_f64(jitter)
}

/// Writes `text` to `path` atomically and durably: temp file, fsync,
/// rename, fsync of the directory.
pub fn persist(path: &Path, text: &str) -> std::io::Result<()> {
    // `<name>.tmp`, not `with_extension`: `bans.state` and `bans.txt`
    // would share `bans.tmp` and could swap contents.
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    // The rename is only durable once the directory entry is: without this
    // a power loss or kill can leave the old file (or none) after a save
    // that was reported done.
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let i = Duration::from_secs(10);
        assert_eq!(next_wait(i, 0), i);
        let w1 = next_wait(i, 1);
        assert!(
            w1 >= Duration::from_secs(15) && w1 <= Duration::from_secs(25),
            "{w1:?}"
        );
        let w9 = next_wait(i, 9);
        assert!(w9 <= Duration::from_secs(200), "{w9:?}");
    }

    #[test]
    fn persist_replaces_the_cache_by_rename() {
        use std::os::unix::fs::MetadataExt;
        let dir = std::env::temp_dir().join(format!(
            "mailmoat-persist-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let cache = dir.join("state/api-cache.txt");
        persist(&cache, "192.0.2.1\n").expect("creates the directory and writes");
        assert_eq!(std::fs::read_to_string(&cache).unwrap(), "192.0.2.1\n");
        // A reader holding the old version keeps reading it whole.
        let old = std::fs::File::open(&cache).unwrap();
        let old_inode = old.metadata().unwrap().ino();

        persist(&cache, "192.0.2.2\n198.51.100.0/24\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(&cache).unwrap(),
            "192.0.2.2\n198.51.100.0/24\n"
        );
        assert_ne!(
            std::fs::metadata(&cache).unwrap().ino(),
            old_inode,
            "renamed, not rewritten"
        );
        assert_eq!(
            std::io::read_to_string(old).unwrap(),
            "192.0.2.1\n",
            "the old version was never truncated"
        );
        assert!(
            !dir.join("state/api-cache.txt.tmp").exists(),
            "no temp file left"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
