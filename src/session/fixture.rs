//! What every protocol module's tests build a module from: a config, its
//! metrics and detached shaping. Each module's tests add their own
//! constructor (`smtp`, `imap`, `pop3`) in an `impl Fixture` of their own.

use std::sync::Arc;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::shaping::Shaping;

pub struct Fixture {
    pub config: Config,
    pub metrics: Arc<Metrics>,
    pub shaping: Shaping,
}

impl Fixture {
    pub fn new(toml: &str) -> Fixture {
        let config = Config::from_toml(toml, std::path::Path::new("test.toml")).expect("config");
        let metrics = Arc::new(Metrics::new());
        let shaping = Shaping::detached(&config, &metrics);
        Fixture {
            config,
            metrics,
            shaping,
        }
    }

    /// The value of one exposed series, 0 when it is not there yet.
    pub fn counted(&self, series: &str) -> f64 {
        self.metrics
            .render()
            .lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    pub fn protocol_errors(&self) -> u64 {
        self.metrics.protocol_errors.get()
    }
}
