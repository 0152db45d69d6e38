//! What the lists say about one address: the answer `/admin/lookup` serves
//! (as text, or JSON with `format=json`) and `mailmoat lookup` prints,
//! whether the running proxy or the files on disk answered.

use std::fmt::Write as _;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::blocklist::{Lists, Verdict};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    /// The allowlist covers it (whatever the blocklist says).
    Allowed,
    Blocked,
    Unlisted,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lookup {
    pub ip: IpAddr,
    pub decision: Decision,
    /// The source and entry that decided, unless unlisted.
    pub source: Option<String>,
    pub entry: Option<IpNet>,
    /// Every entry covering the address, decisive one first, for people.
    pub explain: Vec<String>,
    /// Sessions open from the address; only the running proxy knows.
    pub sessions: Option<usize>,
    /// The fleet node whose ban decided, when another node made it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
}

impl Lookup {
    pub fn new(lists: &Lists, ip: IpAddr, sessions: Option<usize>) -> Lookup {
        let (decision, source, entry) = match lists.verdict(ip) {
            Verdict::Allowed { source, entry } => (Decision::Allowed, Some(source), Some(entry)),
            Verdict::Blocked { source, entry } => (Decision::Blocked, Some(source), Some(entry)),
            Verdict::Unlisted => (Decision::Unlisted, None, None),
        };
        Lookup {
            ip,
            decision,
            source,
            entry,
            explain: lists.explain(ip),
            sessions,
            origin: None,
        }
    }

    /// The entry that decided, when the automatic bans hold it.
    pub fn ban_entry(&self) -> Option<IpNet> {
        let source = self.source.as_deref()?;
        (source == crate::bans::source().name.as_str())
            .then_some(self.entry)
            .flatten()
    }

    pub fn is_blocked(&self) -> bool {
        self.decision == Decision::Blocked
    }

    /// The address, then one indented line per entry and the open sessions.
    pub fn to_text(&self) -> String {
        let mut text = format!("{}\n", self.ip);
        for line in &self.explain {
            let _ = writeln!(text, "  {line}");
        }
        if let Some(node) = &self.origin {
            let _ = writeln!(text, "  banned by node {node} (shared through the fleet)");
        }
        if let Some(sessions) = self.sessions {
            let _ = writeln!(text, "  open sessions: {sessions}");
        }
        text
    }
}
