//! Longest-prefix match over IPv4 and IPv6 networks.
//!
//! One hash table per prefix length that occurs, probed from the longest
//! length down. Real lists use a handful of lengths (/32, /24, /128, /64,
//! /48), so a lookup is a few hash probes, and a build is one pass over the
//! entries: both stay far inside SPEC's 200 ns and 1 s at a million entries.

use std::net::IpAddr;

use ipnet::IpNet;
use rustc_hash::FxHashMap;

/// A set of networks, each tagged with a value. The lists keep one set per
/// source, tagged `()`: the set says which source it is.
#[derive(Debug, Clone)]
pub struct IpSet<V> {
    v4: Vec<(u8, FxHashMap<u32, V>)>,
    /// IPv6 prefixes longer than /64.
    v6_long: Vec<(u8, FxHashMap<u128, V>)>,
    /// IPv6 prefixes of /64 and shorter (most of a real list), keyed by
    /// their upper half: half the memory per entry, fewer cache misses.
    v6_short: Vec<(u8, FxHashMap<u64, V>)>,
    len: usize,
}

impl<V> Default for IpSet<V> {
    fn default() -> Self {
        IpSet {
            v4: Vec::new(),
            v6_long: Vec::new(),
            v6_short: Vec::new(),
            len: 0,
        }
    }
}

impl IpSet<()> {
    /// The set of `nets` (one source's entries).
    pub fn from_nets(nets: &[IpNet]) -> Self {
        let mut set = IpSet::new();
        for net in nets {
            set.insert(*net, ());
        }
        set
    }
}

impl<V: Copy> IpSet<V> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `net`; an existing equal network keeps its first value.
    pub fn insert(&mut self, net: IpNet, value: V) {
        let inserted = match net {
            IpNet::V4(n) => {
                let table = table(&mut self.v4, n.prefix_len());
                insert_new(table, u32::from(n.network()), value)
            }
            IpNet::V6(n) if n.prefix_len() > 64 => {
                let table = table(&mut self.v6_long, n.prefix_len());
                insert_new(table, u128::from(n.network()), value)
            }
            IpNet::V6(n) => {
                let table = table(&mut self.v6_short, n.prefix_len());
                insert_new(table, (u128::from(n.network()) >> 64) as u64, value)
            }
        };
        self.len += usize::from(inserted);
    }

    /// The longest network containing `ip`, with its value.
    pub fn lookup(&self, ip: IpAddr) -> Option<(IpNet, V)> {
        match ip.to_canonical() {
            IpAddr::V4(ip) => {
                let bits = u32::from(ip);
                self.v4.iter().find_map(|(len, table)| {
                    let key = bits & mask32(*len);
                    let v = table.get(&key)?;
                    Some((IpNet::new(IpAddr::V4(key.into()), *len).ok()?, *v))
                })
            }
            IpAddr::V6(ip) => {
                let bits = u128::from(ip);
                let long = self.v6_long.iter().find_map(|(len, table)| {
                    let key = bits & mask128(*len);
                    let v = table.get(&key)?;
                    Some((IpNet::new(IpAddr::V6(key.into()), *len).ok()?, *v))
                });
                long.or_else(|| {
                    let high = (bits >> 64) as u64;
                    self.v6_short.iter().find_map(|(len, table)| {
                        let key = high & mask64(*len);
                        let v = table.get(&key)?;
                        let net = u128::from(key) << 64;
                        Some((IpNet::new(IpAddr::V6(net.into()), *len).ok()?, *v))
                    })
                })
            }
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.lookup(ip).is_some()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

fn table<K, V>(tables: &mut Vec<(u8, FxHashMap<K, V>)>, len: u8) -> &mut FxHashMap<K, V> {
    let i = match tables.binary_search_by(|(l, _)| len.cmp(l)) {
        Ok(i) => i,
        Err(i) => {
            tables.insert(i, (len, FxHashMap::default()));
            i
        }
    };
    &mut tables[i].1
}

fn insert_new<K: std::hash::Hash + Eq, V>(table: &mut FxHashMap<K, V>, key: K, value: V) -> bool {
    match table.entry(key) {
        std::collections::hash_map::Entry::Occupied(_) => false,
        std::collections::hash_map::Entry::Vacant(e) => {
            e.insert(value);
            true
        }
    }
}

fn mask32(len: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0)
}

fn mask64(len: u8) -> u64 {
    u64::MAX.checked_shl(64 - u32::from(len)).unwrap_or(0)
}

fn mask128(len: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn longest_prefix_wins_and_families_stay_apart() {
        let mut set = IpSet::new();
        set.insert("10.0.0.0/8".parse().unwrap(), 1);
        set.insert("10.1.2.0/24".parse().unwrap(), 2);
        set.insert("2001:db8::/64".parse().unwrap(), 3);
        set.insert("0.0.0.0/0".parse().unwrap(), 4);
        set.insert("2001:db8::/32".parse().unwrap(), 5);
        set.insert("2001:db8::42/128".parse().unwrap(), 6);
        set.insert("::/0".parse().unwrap(), 7);
        assert_eq!(set.lookup(ip("10.1.2.3")).unwrap().1, 2);
        assert_eq!(set.lookup(ip("10.9.9.9")).unwrap().1, 1);
        assert_eq!(set.lookup(ip("11.0.0.1")).unwrap().1, 4);
        let (net, v) = set.lookup(ip("2001:db8::ffff:1")).unwrap();
        assert_eq!((net.to_string().as_str(), v), ("2001:db8::/64", 3));
        assert_eq!(set.lookup(ip("2001:db8:0:1::1")).unwrap().1, 5);
        assert_eq!(set.lookup(ip("2001:db8::42")).unwrap().1, 6);
        let (net, v) = set.lookup(ip("2002::1")).unwrap();
        assert_eq!((net.to_string().as_str(), v), ("::/0", 7));
        assert_eq!(set.lookup(ip("::ffff:10.1.2.3")).unwrap().1, 2);
        assert_eq!(set.len(), 7);
    }
}
