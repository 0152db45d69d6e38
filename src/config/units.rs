//! Human units in the config file: durations (`30s`), sizes (`25MiB`) and
//! rates (`60/min`). Each parser returns a message that says what a valid
//! value looks like, so the config error can tell the operator what to write.

use std::time::Duration;

/// The longest duration accepted anywhere (100 years of 365.25 days): any
/// value up to it can be added to `Instant::now()` or `SystemTime::now()`
/// without overflow, so no timer or expiry computed from a configured (or
/// requested) duration can panic.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 31_557_600);

pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let duration = humantime::parse_duration(text)
        .map_err(|e| format!("{e}; write a duration such as \"500ms\", \"30s\" or \"10m\""))?;
    if duration > MAX_DURATION {
        return Err(format!(
            "longer than the maximum of {}; write a shorter duration",
            humantime::format_duration(MAX_DURATION)
        ));
    }
    Ok(duration)
}

pub fn parse_size(text: &str) -> Result<u64, String> {
    text.trim()
        .parse::<bytesize::ByteSize>()
        .map(|size| size.as_u64())
        .map_err(|e| format!("{e}; write a size such as \"2048\", \"64KiB\" or \"25MiB\""))
}

/// A rate like `60/min` or `1KiB/s`: an amount per unit of time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub amount: u64,
    pub per: Duration,
}

impl Rate {
    pub fn per_second(&self) -> f64 {
        self.amount as f64 / self.per.as_secs_f64()
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{}",
            self.amount,
            humantime::format_duration(self.per)
        )
    }
}

/// Parses `N/unit` where N is a count (`60/min`) or, with `sizes`, a size
/// (`1KiB/s`). The unit is `s`, `min`, `hour`, `day` or any duration (`10m`).
pub fn parse_rate(text: &str, sizes: bool) -> Result<Rate, String> {
    let example = if sizes { "\"1KiB/s\"" } else { "\"60/min\"" };
    let (amount, unit) = text
        .trim()
        .split_once('/')
        .ok_or_else(|| format!("missing '/'; write a rate such as {example}"))?;
    let amount = if sizes {
        parse_size(amount)?
    } else {
        amount
            .trim()
            .parse::<u64>()
            .map_err(|e| format!("bad count {amount:?} ({e}); write a rate such as {example}"))?
    };
    let per = match unit.trim() {
        "s" | "sec" | "second" => Duration::from_secs(1),
        "m" | "min" | "minute" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3600),
        "d" | "day" => Duration::from_secs(86400),
        other => parse_duration(other)?,
    };
    if per.is_zero() {
        return Err(format!(
            "the period must not be zero; write a rate such as {example}"
        ));
    }
    Ok(Rate { amount, per })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_sizes_and_rates_parse_in_human_units() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("3x").is_err());
        assert_eq!(parse_size("25MiB"), Ok(25 * 1024 * 1024));
        assert_eq!(parse_size("2048"), Ok(2048));
        assert!(parse_size("lots").is_err());
        let rate = parse_rate("60/min", false).unwrap();
        assert_eq!(rate.amount, 60);
        assert_eq!(rate.per, Duration::from_secs(60));
        assert_eq!(parse_rate("1KiB/s", true).unwrap().amount, 1024);
        assert!(parse_rate("60", false).is_err());
        assert!(parse_rate("60/0s", false).is_err());
    }

    #[test]
    fn durations_too_long_to_add_to_now_are_refused() {
        assert_eq!(parse_duration("100years"), Ok(MAX_DURATION));
        for text in ["101years", "10000000000000000000s", "18446744073709551615s"] {
            let e = parse_duration(text).unwrap_err();
            assert!(e.contains("maximum of 100years"), "{text}: {e}");
        }
        assert!(parse_rate("1/200years", false).is_err());
    }
}
