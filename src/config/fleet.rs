//! `[fleet]`: the Redis (or Valkey) a fleet of nodes shares bans and rate
//! counters through. Only validated here; the password file is read when
//! the fleet starts ([`FleetSettings::password`]), like the other secrets.

use std::time::Duration;

use redis::IntoConnectionInfo;
use toml::Spanned;

use super::file::{FleetFile, Raw, Scalar};
use super::{units, FleetSettings, SharedRate, Validator};

/// Where the kernel keeps the host name the default `node` is taken from.
const HOSTNAME_FILE: &str = "/proc/sys/kernel/hostname";

/// The node name when the host name cannot be read or has nothing usable.
const FALLBACK_NODE: &str = "mailmoat";

const MAX_NODE_LEN: usize = 64;
const MAX_KEY_PREFIX_LEN: usize = 64;
const MAX_NODES: u32 = 1000;

/// A Redis password is a line, not a document: a path pointing at a big
/// file is a mistake, refused before it fills the memory.
const MAX_PASSWORD_FILE: u64 = 4096;

impl FleetSettings {
    /// The Redis password from `password_file` (its trailing newline
    /// dropped), or none without one. Read when the fleet starts, so the
    /// password never sits in the config or its printed form.
    pub fn password(&self) -> Result<Option<String>, String> {
        let Some(path) = &self.password_file else {
            return Ok(None);
        };
        let shown = path.display();
        let bytes = crate::files::read_bounded(path, MAX_PASSWORD_FILE).map_err(|e| {
            format!(
                "cannot read fleet.password_file {shown}: {e}; check the path, and that \
                 mailmoat's user may read it"
            )
        })?;
        let text = String::from_utf8(bytes).map_err(|_| {
            format!("fleet.password_file {shown} is not UTF-8 text; write the Redis password in it")
        })?;
        let password = text.trim_end_matches(['\n', '\r']);
        if password.is_empty() {
            return Err(format!(
                "fleet.password_file {shown} is empty; write the Redis password (its \
                 requirepass) in it, or remove fleet.password_file"
            ));
        }
        if password.contains(['\n', '\r']) {
            return Err(format!(
                "fleet.password_file {shown} holds more than one line; write only the Redis \
                 password in it"
            ));
        }
        Ok(Some(password.to_string()))
    }
}

impl Validator<'_> {
    /// `[fleet]`, written at `raw`'s span.
    pub(super) fn fleet(&mut self, raw: Spanned<FleetFile>) -> FleetSettings {
        let section = raw.span();
        let f = raw.into_inner();
        let url_scheme = match f.url {
            Some(url) => match check_url(url.get_ref()) {
                Ok(scheme) => Some((url.into_inner(), scheme)),
                Err(e) => {
                    self.problem("fleet.url", url.span(), &e);
                    None
                }
            },
            None => {
                self.problem_at(
                    Some(section),
                    "fleet.url is missing: [fleet] needs url = \"redis://HOST:6379/0\" (or \
                     \"rediss://\" for TLS), or remove the section to run this node on its own"
                        .into(),
                );
                None
            }
        };
        let tls = url_scheme.as_ref().is_some_and(|(_, s)| s == "rediss");
        let ca_span = f.ca_file.as_ref().map(Spanned::span);
        let ca_file = self.optional_path(f.ca_file);
        if let (Some(span), Some(_), Some(_), false) = (ca_span, &ca_file, &url_scheme, tls) {
            self.problem(
                "fleet.ca_file",
                span,
                "is set but fleet.url is not rediss://: the CA only verifies a TLS \
                 connection; write rediss:// in fleet.url, or remove fleet.ca_file",
            );
        }
        FleetSettings {
            url: url_scheme.map(|(url, _)| url).unwrap_or_default(),
            password_file: self.optional_path(f.password_file),
            ca_file,
            key_prefix: self.text("fleet.key_prefix", f.key_prefix, "mailmoat:", key_prefix),
            node: match f.node {
                Some(node) => self.text("fleet.node", Some(node), "", |s| {
                    node_name(s).map(str::to_string)
                }),
                None => node_from_host_name(std::fs::read_to_string(HOSTNAME_FILE).ok()),
            },
            nodes: self.parse("fleet.nodes", f.nodes, "0", |s| match s.parse::<u32>() {
                Ok(n) if n <= MAX_NODES => Ok(n),
                _ => Err(format!(
                    "write the number of nodes in the fleet, from 1 to {MAX_NODES}, or 0 to \
                     learn it from the nodes heard"
                )),
            }),
            shared_rates: self.shared_rates(f.shared_rates),
            timeout: self.between("fleet.timeout", f.timeout, "250ms", MS, MINUTE),
            connect_timeout: self.between(
                "fleet.connect_timeout",
                f.connect_timeout,
                "1s",
                MS,
                MINUTE,
            ),
            breaker_failures: self.count("fleet.breaker_failures", f.breaker_failures, "3"),
            breaker_cooldown: self.between(
                "fleet.breaker_cooldown",
                f.breaker_cooldown,
                "5s",
                Duration::from_millis(100),
                HOUR,
            ),
            heartbeat: self.between(
                "fleet.heartbeat",
                f.heartbeat,
                "1s",
                Duration::from_millis(100),
                HOUR,
            ),
            resync: self.between(
                "fleet.resync",
                f.resync,
                "30s",
                Duration::from_secs(1),
                units::MAX_DURATION,
            ),
        }
    }

    /// The rates named, each once; `[]` shares none.
    fn shared_rates(&mut self, raw: Raw<Vec<String>>) -> Vec<SharedRate> {
        let Some(raw) = raw else {
            return SharedRate::DEFAULT.to_vec();
        };
        let span = raw.span();
        let mut rates = Vec::new();
        for name in raw.into_inner() {
            match SharedRate::ALL.into_iter().find(|r| r.as_str() == name) {
                Some(rate) if rates.contains(&rate) => self.problem(
                    "fleet.shared_rates",
                    span.clone(),
                    &format!("{name:?} is listed twice; name each rate once"),
                ),
                Some(rate) => rates.push(rate),
                None => self.problem(
                    "fleet.shared_rates",
                    span.clone(),
                    &format!(
                        "{name:?} is not a rate the fleet can share; write some of \
                         \"connection_rate\", \"message_rate\", \"recipient_rate\" (or [] \
                         for none)"
                    ),
                ),
            }
        }
        rates
    }

    /// A duration from `min` to `max`.
    fn between(
        &mut self,
        key: &str,
        raw: Raw<Scalar>,
        default: &str,
        min: Duration,
        max: Duration,
    ) -> Duration {
        self.parse(key, raw, default, |s| match units::parse_duration(s)? {
            d if d < min || d > max => Err(format!(
                "must be from {} to {}",
                humantime::format_duration(min),
                humantime::format_duration(max)
            )),
            d => Ok(d),
        })
    }

    /// A string key checked by `check`; `default` when absent.
    fn text(
        &mut self,
        key: &str,
        raw: Raw<String>,
        default: &str,
        check: impl Fn(&str) -> Result<String, String>,
    ) -> String {
        let Some(raw) = raw else {
            return default.to_string();
        };
        match check(raw.get_ref()) {
            Ok(value) => value,
            Err(e) => {
                self.problem(key, raw.span(), &format!("{:?}: {e}", raw.get_ref()));
                default.to_string()
            }
        }
    }
}

const MS: Duration = Duration::from_millis(1);
const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);

/// Checks a Redis URL the way the `redis` crate will read it, and returns
/// its scheme. The password never goes in it: the config is printed
/// (`check-config`, logs), the password file is not.
fn check_url(text: &str) -> Result<String, String> {
    let usage = "write redis://HOST:PORT/DB, rediss://HOST:PORT/DB (TLS) or \
                 redis+unix:///PATH/TO/redis.sock";
    let Some(url) = redis::parse_redis_url(text) else {
        return Err(format!("{text:?} is not a Redis URL; {usage}"));
    };
    let scheme = url.scheme().to_string();
    if !matches!(scheme.as_str(), "redis" | "rediss" | "redis+unix") {
        return Err(format!(
            "{text:?}: the scheme {scheme}:// is not supported (Valkey speaks the same \
             protocol as Redis); {usage}"
        ));
    }
    let pass_in_query = url.query_pairs().any(|(k, _)| k == "pass");
    if url.password().is_some() || pass_in_query {
        // Not echoed: the error is printed and logged.
        return Err(
            "the URL holds a password, which anyone who can read the config or \
                    its printed form would see; put the password in a file, name it with \
                    fleet.password_file, and remove it from the URL"
                .into(),
        );
    }
    if url.fragment().is_some() {
        return Err(format!(
            "{text:?}: a #fragment (such as #insecure) is not supported; the server's \
             certificate is always verified (give its CA with fleet.ca_file); {usage}"
        ));
    }
    let info = url
        .into_connection_info()
        .map_err(|e| format!("{text:?}: {e}; {usage}"))?;
    if info.redis_settings().db() < 0 {
        return Err(format!(
            "{text:?}: the database number must be 0 or more; {usage}"
        ));
    }
    Ok(scheme)
}

/// Printable ASCII without spaces: keys and channels are read by people
/// (`redis-cli KEYS 'mailmoat:*'`) and typed into shells.
fn key_prefix(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > MAX_KEY_PREFIX_LEN || !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "write 1 to {MAX_KEY_PREFIX_LEN} printable ASCII characters without spaces, such \
             as \"mailmoat:\" or \"mx-eu:\""
        ));
    }
    Ok(s.to_string())
}

/// A node's name: it appears in Redis keys, `/admin/fleet`, the state
/// file's `node=` and logs.
fn node_name(s: &str) -> Result<&str, String> {
    let valid = (1..=MAX_NODE_LEN).contains(&s.len()) && s.bytes().all(node_byte);
    if !valid {
        return Err(format!(
            "write 1 to {MAX_NODE_LEN} of the characters A-Z a-z 0-9 . _ -, such as \"mx1\""
        ));
    }
    Ok(s)
}

fn node_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')
}

/// The default node name: the host name, each character a name may not
/// hold replaced with `-` and cut to the longest name; "mailmoat" when it
/// could not be read or is empty.
fn node_from_host_name(host_name: Option<String>) -> String {
    let name: String = host_name
        .as_deref()
        .unwrap_or_default()
        .trim()
        .chars()
        .map(|c| match u8::try_from(c) {
            Ok(b) if node_byte(b) => c,
            _ => '-',
        })
        .take(MAX_NODE_LEN)
        .collect();
    if name.is_empty() {
        FALLBACK_NODE.to_string()
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::super::load_in;
    use super::*;

    fn fleet(lines: &str) -> Result<FleetSettings, Vec<String>> {
        load_in(&format!("[fleet]\n{lines}"), None).map(|c| c.fleet.expect("[fleet] is set"))
    }

    /// The problems of a `[fleet]` of `lines`, each starting with its prefix.
    fn assert_problems(lines: &str, prefixes: &[&str]) {
        let found = fleet(lines).expect_err("the config should be refused");
        assert_eq!(found.len(), prefixes.len(), "{found:#?}");
        for (problem, prefix) in found.iter().zip(prefixes) {
            assert!(
                problem.starts_with(prefix),
                "{problem:?} should start with {prefix:?}"
            );
        }
    }

    const URL: &str = "url = \"redis://127.0.0.1:6379/0\"\n";

    #[test]
    fn without_fleet_the_node_is_on_its_own() {
        assert!(load_in("", None).unwrap().fleet.is_none());
    }

    #[test]
    fn fleet_keys_left_out_take_the_documented_defaults() {
        let f = fleet(URL).unwrap();
        assert_eq!(f.url, "redis://127.0.0.1:6379/0");
        assert_eq!((f.password_file, f.ca_file), (None, None));
        assert_eq!(f.key_prefix, "mailmoat:");
        assert_eq!(
            f.node,
            node_from_host_name(std::fs::read_to_string(HOSTNAME_FILE).ok())
        );
        assert_eq!(f.nodes, 0);
        assert_eq!(f.shared_rates, SharedRate::DEFAULT);
        assert_eq!(f.timeout, Duration::from_millis(250));
        assert_eq!(f.connect_timeout, Duration::from_secs(1));
        assert_eq!(f.breaker_failures, 3);
        assert_eq!(f.breaker_cooldown, Duration::from_secs(5));
        assert_eq!(f.heartbeat, Duration::from_secs(1));
        assert_eq!(f.resync, Duration::from_secs(30));
    }

    /// The commented-out [fleet] of the shipped file, uncommented, loads,
    /// and each key it shows is at its default (but the example's url,
    /// files and node).
    #[test]
    fn the_documented_fleet_example_is_valid_and_shows_the_defaults() {
        let shipped = super::super::SHIPPED_CONFIG;
        let start = shipped
            .find("\n# [fleet]\n")
            .expect("[fleet] is documented");
        let example: String = shipped[start..]
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| l.starts_with('[') || l.contains(" = "))
            .map(|l| format!("{l}\n"))
            .collect();
        let documented = load_in(&example, None)
            .unwrap_or_else(|e| panic!("{e:?} in\n{example}"))
            .fleet
            .unwrap();
        assert_eq!(example.lines().count(), 14, "every key shown:\n{example}");
        let mut defaults = fleet(&format!("url = {:?}\nnode = \"mx1\"\n", documented.url)).unwrap();
        defaults.password_file = documented.password_file.clone();
        defaults.ca_file = documented.ca_file.clone();
        assert_eq!(
            serde_json::to_value(&documented).unwrap(),
            serde_json::to_value(&defaults).unwrap()
        );
    }

    #[test]
    fn a_fleet_without_url_is_refused_at_the_section_line() {
        let found = load_in("[log]\nlevel = \"info\"\n\n[fleet]\nnodes = 3\n", None).unwrap_err();
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with("m.toml:4: fleet.url is missing: [fleet] needs url = "),
            "{found:?}"
        );
    }

    #[test]
    fn redis_rediss_and_unix_socket_urls_are_accepted() {
        for url in [
            "redis://127.0.0.1:6379/0",
            "redis://redis.internal",
            "redis://[::1]:6379/15",
            "redis://mailmoat@10.0.0.5:6379/1",
            "rediss://redis.internal:6380/2",
            "redis+unix:///run/redis/redis-server.sock?db=1",
        ] {
            let f = fleet(&format!("url = \"{url}\"\n")).unwrap_or_else(|e| panic!("{url}: {e:?}"));
            assert_eq!(f.url, url);
        }
    }

    /// The config and its errors are printed and logged: a password in the
    /// URL would be in both.
    #[test]
    fn a_password_in_the_fleet_url_is_refused_without_being_repeated() {
        for url in [
            "redis://:s3cret@127.0.0.1:6379/0",
            "rediss://mailmoat:s3cret@redis.internal/0",
            "redis+unix:///run/redis.sock?pass=s3cret",
        ] {
            let found = fleet(&format!("url = \"{url}\"\n")).unwrap_err();
            assert_eq!(found.len(), 1, "{found:?}");
            assert!(found[0].starts_with("m.toml:2: fleet.url = "), "{found:?}");
            assert!(found[0].contains("fleet.password_file"), "{found:?}");
            assert!(!found[0].contains("s3cret"), "{found:?}");
        }
    }

    #[test]
    fn fleet_urls_redis_cannot_use_are_refused_saying_what_to_write() {
        for (url, says) in [
            ("https://redis.internal/", "is not a Redis URL"),
            ("127.0.0.1:6379", "is not a Redis URL"),
            ("valkey://127.0.0.1/0", "scheme valkey:// is not supported"),
            ("unix:///run/redis.sock", "scheme unix:// is not supported"),
            ("rediss://redis.internal/0#insecure", "always verified"),
            ("redis://0.0.0.0:6379/0", "wildcard"),
            ("redis://127.0.0.1/zero", "Invalid database number"),
            ("redis://127.0.0.1/-1", "0 or more"),
            ("redis:///0", "Missing hostname"),
        ] {
            let found = fleet(&format!("url = \"{url}\"\n")).unwrap_err();
            assert_eq!(found.len(), 1, "{url}: {found:?}");
            assert!(found[0].starts_with("m.toml:2: fleet.url = "), "{found:?}");
            assert!(found[0].contains(says), "{url}: {found:?}");
            assert!(found[0].contains("write redis://"), "{url}: {found:?}");
        }
    }

    #[test]
    fn a_fleet_ca_file_without_rediss_is_refused() {
        assert_problems(
            &format!("{URL}ca_file = \"redis-ca.pem\"\n"),
            &["m.toml:3: fleet.ca_file = is set but fleet.url is not rediss://"],
        );
        let f = fleet("url = \"rediss://r.internal/0\"\nca_file = \"redis-ca.pem\"\n").unwrap();
        assert_eq!(f.ca_file, Some(PathBuf::from("redis-ca.pem")));
    }

    #[test]
    fn fleet_files_are_relative_to_the_config_directory() {
        let text = "[fleet]\nurl = \"rediss://r.internal/0\"\npassword_file = \"redis-pass\"\n\
                    ca_file = \"/etc/ssl/redis-ca.pem\"\n";
        let base = Path::new("/etc/mailmoat");
        let f = load_in(text, Some(base)).unwrap().fleet.unwrap();
        assert_eq!(f.password_file, Some(base.join("redis-pass")));
        assert_eq!(f.ca_file, Some(PathBuf::from("/etc/ssl/redis-ca.pem")));
        let f = fleet(&format!("{URL}password_file = \"\"\n")).unwrap();
        assert_eq!(f.password_file, None, "empty: none");
    }

    #[test]
    fn key_prefix_and_node_names_that_would_garble_keys_are_refused() {
        let long = "x".repeat(65);
        for bad in ["", "two words", "tab\there", "é:", long.as_str()] {
            assert_problems(
                &format!("{URL}key_prefix = {bad:?}\n"),
                &["m.toml:3: fleet.key_prefix = "],
            );
        }
        for bad in ["", "mx 1", "mx1:", "mx/1", "ñ", long.as_str()] {
            assert_problems(
                &format!("{URL}node = {bad:?}\n"),
                &["m.toml:3: fleet.node = "],
            );
        }
        let f = fleet(&format!(
            "{URL}key_prefix = \"{{eu}}:mx-\"\nnode = \"{}\"\n",
            "mx-1.eu_west".to_string() + &"9".repeat(52)
        ))
        .unwrap();
        assert_eq!(f.key_prefix, "{eu}:mx-");
        assert_eq!(f.node.len(), 64);
    }

    #[test]
    fn the_default_node_name_is_the_host_name_made_valid() {
        let host = |s: &str| node_from_host_name(Some(s.into()));
        assert_eq!(host("mx1.example.net\n"), "mx1.example.net");
        assert_eq!(host("mx 1/é\n"), "mx-1--");
        assert_eq!(host(&"a".repeat(100)), "a".repeat(64));
        assert_eq!(host(" \n"), "mailmoat");
        assert_eq!(node_from_host_name(None), "mailmoat");
        assert!(node_name(&host("bad host ñame")).is_ok());
    }

    #[test]
    fn nodes_and_breaker_failures_are_bounded() {
        assert_eq!(fleet(&format!("{URL}nodes = 1000\n")).unwrap().nodes, 1000);
        for bad in ["1001", "-1", "\"three\""] {
            assert_problems(
                &format!("{URL}nodes = {bad}\n"),
                &["m.toml:3: fleet.nodes = "],
            );
        }
        assert_problems(
            &format!("{URL}breaker_failures = 0\n"),
            &["m.toml:3: fleet.breaker_failures = \"0\": must be greater than zero"],
        );
    }

    #[test]
    fn shared_rates_name_each_rate_once_and_may_be_empty() {
        let f = fleet(&format!("{URL}shared_rates = [\"message_rate\"]\n")).unwrap();
        assert_eq!(f.shared_rates, [SharedRate::MessageRate]);
        let f = fleet(&format!("{URL}shared_rates = []\n")).unwrap();
        assert!(f.shared_rates.is_empty());
        assert_problems(
            &format!("{URL}shared_rates = [\"message_rate\", \"message_rate\", \"messages\"]\n"),
            &[
                "m.toml:3: fleet.shared_rates = \"message_rate\" is listed twice",
                "m.toml:3: fleet.shared_rates = \"messages\" is not a rate the fleet can share",
            ],
        );
    }

    /// Zero would spin a loop or make every command time out; hours would
    /// hold a connection, or the breaker, for as long.
    #[test]
    fn fleet_durations_out_of_their_range_are_refused_naming_it() {
        assert_problems(
            &format!(
                "{URL}timeout = \"0\"\nconnect_timeout = \"61s\"\nbreaker_cooldown = \"99ms\"\n\
                 heartbeat = \"2h\"\nresync = \"999ms\"\n"
            ),
            &[
                "m.toml:3: fleet.timeout = \"0\": must be from 1ms to 1m",
                "m.toml:4: fleet.connect_timeout = \"61s\": must be from 1ms to 1m",
                "m.toml:5: fleet.breaker_cooldown = \"99ms\": must be from 100ms to 1h",
                "m.toml:6: fleet.heartbeat = \"2h\": must be from 100ms to 1h",
                "m.toml:7: fleet.resync = \"999ms\": must be from 1s to 100years",
            ],
        );
        let f = fleet(&format!(
            "{URL}timeout = \"1ms\"\nconnect_timeout = \"60s\"\nheartbeat = \"100ms\"\n\
             resync = \"1s\"\nbreaker_cooldown = \"1h\"\n"
        ))
        .unwrap();
        assert_eq!(f.timeout, Duration::from_millis(1));
        assert_eq!(f.breaker_cooldown, HOUR);
    }

    #[test]
    fn unknown_fleet_keys_and_wrong_types_are_each_reported() {
        assert_problems(
            &format!("{URL}nodez = 3\nnode = 5\ntimeout = true\n"),
            &[
                "m.toml:3: fleet.nodez: unknown key `nodez`, expected one of `url`",
                "m.toml:4: fleet.node: invalid type: integer `5`, expected a string",
                "m.toml:5: fleet.timeout = true: expected a string or a number",
            ],
        );
    }

    /// A directory of its own for each test, under the system's temp dir.
    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("mailmoat-fleet-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn with_password_file(path: &Path) -> FleetSettings {
        let mut f = fleet(URL).unwrap();
        f.password_file = Some(path.to_owned());
        f
    }

    #[test]
    fn the_fleet_password_is_the_file_without_its_line_end() {
        assert_eq!(fleet(URL).unwrap().password(), Ok(None));
        let dir = temp_dir("password");
        let path = dir.join("redis-pass");
        for written in ["s3cret pass", "s3cret pass\n", "s3cret pass\r\n"] {
            std::fs::write(&path, written).unwrap();
            assert_eq!(
                with_password_file(&path).password(),
                Ok(Some("s3cret pass".into())),
                "{written:?}"
            );
        }
    }

    #[test]
    fn a_fleet_password_file_that_cannot_be_the_password_is_an_error_naming_it() {
        let dir = temp_dir("bad-password");
        let path = dir.join("redis-pass");
        let shown = path.display().to_string();
        let missing = with_password_file(&dir.join("missing"))
            .password()
            .unwrap_err();
        assert!(
            missing.starts_with("cannot read fleet.password_file ")
                && missing.contains("missing")
                && missing.contains("check the path"),
            "{missing}"
        );
        for (written, says) in [
            (b"\n".to_vec(), "is empty"),
            (b"one\ntwo\n".to_vec(), "more than one line"),
            (vec![0xff, 0xfe], "not UTF-8"),
            (vec![b'x'; 5000], "larger than 4096 bytes"),
        ] {
            std::fs::write(&path, &written).unwrap();
            let e = with_password_file(&path).password().unwrap_err();
            assert!(e.contains(&shown) && e.contains(says), "{says}: {e}");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}
